"""``lowshot`` command line: each subcommand parses, builds a config, calls the library.

User mistakes (LowshotError) print one line and exit 2; ``--debug`` shows the traceback.

Order rule: options, positionals and ``key=value`` words may come in any order, and ``--debug``
anywhere. A ``key=value`` word is an override / method option wherever it stands (also right after
a list option such as ``--shot 1 5``), except as the value of an option that takes one value
(``--out a=b.json``); everything after ``--`` is positional.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from .argtypes import int_at_least
from .errors import LowshotError


# ----------------------------------------------------------------------------- subcommands

def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train
    if args.resume:
        from pathlib import Path
        overrides = ([args.config] if args.config else []) + list(args.overrides)  # argparse puts key=value first
        if args.config and "=" not in args.config:
            raise LowshotError("--resume continues a run with the config stored in its checkpoint; drop CONFIG "
                               "(only train.epochs=N and a few other keys may change: see docs/runs.md)")
        if args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            raise LowshotError(f"--resume {args.resume} continues that run in its own folder; drop --run-dir "
                               f"{args.run_dir} (copy the folder first to continue it elsewhere)")
        if args.overwrite:
            raise LowshotError("--resume and --overwrite exclude each other")
        res = train(load_config(None), args.resume, resume=True, overrides=overrides)  # the checkpoint's config
    else:
        if args.config is None:
            raise LowshotError("lowshot train needs a CONFIG (a YAML file, or a packaged recipe name such as "
                               "fashion_mnist/conv4_neg_cosine) or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        res = train(cfg, args.run_dir, overwrite=args.overwrite)
    print(f"run directory: {res['run_dir']}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .embed import embed_dataset_split, embed_images, save_npz
    if bool(args.images) == bool(args.split):
        raise LowshotError("lowshot embed needs exactly one of --images PATH... or --split NAME")
    if args.images:
        out = embed_images(args.checkpoint, args.images, batch_size=args.batch_size, device=args.device)
    else:
        out = embed_dataset_split(args.checkpoint, args.split, dataset=args.dataset, root=args.root,
                                  batch_size=args.batch_size, device=args.device)
    save_npz(args.out, out)
    print(f"wrote {args.out}: features {tuple(out['features'].shape)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from . import data
    if args.action == "list":
        for name in data.list_datasets():
            print(name)
        return 0
    if not args.name:
        raise LowshotError(f"lowshot data {args.action} needs a dataset NAME (see `lowshot data list`)")
    if args.action == "info":
        print(data.dataset_summary(args.name, root=args.root))
    else:
        from .data.info import fetch_dataset
        path, fetched = fetch_dataset(args.name, root=args.root)
        if fetched:
            print(f"downloaded {len(fetched)} file(s) to {path}")
        else:
            print(f"{args.name} is already present at {path}; nothing downloaded")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_safetensors, load_checkpoint
    from .utils import require
    require("safetensors.torch", "lowshot export")  # before reading the checkpoint
    path = export_safetensors(load_checkpoint(args.checkpoint), args.out)
    print(f"wrote {path} (backbone as model.*, head as head.*)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out_dir=args.out, quick=args.quick, overrides=args.overrides)
    return 0


# ----------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line, exit 2 (usage stays behind ``-h``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowshot", description=__doc__.splitlines()[0] if __doc__ else None,
                epilog="Options, positionals and key=value words may come in any order; --debug anywhere.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train backbone + head on the base classes",
                       epilog="Options and key=value overrides may come in any order, e.g. "
                              "`lowshot train omniglot/oneshot --run-dir runs/x train.epochs=2`.")
    t.add_argument("config", nargs="?",
                   help="YAML config file, or a packaged recipe by name from any folder (e.g. omniglot/oneshot)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. head.margin=-0.02")
    t.add_argument("--run-dir", help="run directory (default: OUT_DIR/NAME from the config)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly (train.epochs=N "
                   "extends a finished one)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("embed", help="export features of images or a dataset split to .npz")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--images", nargs="+", help="image files or directories (recursive png/jpg)")
    e.add_argument("--split", help="a split of the checkpoint's dataset (e.g. novel)")
    e.add_argument("--dataset", help="another registered dataset for --split")
    e.add_argument("--root", help="dataset root for --split")
    e.add_argument("--out", required=True, help="output .npz (features, paths or labels)")
    e.add_argument("--batch-size", type=int_at_least(1), default=256)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_embed)

    d = sub.add_parser("data", help="list, describe or download datasets")
    d.add_argument("action", choices=["list", "info", "download"])
    d.add_argument("name", nargs="?")
    d.add_argument("--root")
    d.set_defaults(func=cmd_data)

    x = sub.add_parser("export", help="export a checkpoint's weights to safetensors")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="output .safetensors file")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="the quick start on Fashion-MNIST")
    m.add_argument("--out", default="runs/demo", help="where the demo writes its runs and report")
    m.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    m.add_argument("overrides", nargs="*", help="key=value overrides for the demo's training config")
    m.set_defaults(func=cmd_demo)

    # commands defined next to their feature: eval, decouple, analyze + sweep, report
    from .analysis import cli as analysis_cli
    from .fewshot import cli as fewshot_cli
    from .longtail import cli as longtail_cli
    from .report import cli as report_cli
    for module in (fewshot_cli, longtail_cli, analysis_cli, report_cli):
        module.register(sub)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    return p


_KV_WORD = re.compile(r"^[A-Za-z_][\w.]*=")
_KV_DESTS = ("overrides", "options", "grid")  # the positionals that take key=value words


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _option_action(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    """The option ``word`` names, allowing argparse's unique-prefix abbreviations."""
    table = parser._option_string_actions
    if word in table:
        return table[word]
    hits = {a for opt, a in table.items() if opt.startswith("--") and opt.startswith(word)} if word.startswith("--") \
        else set()
    return hits.pop() if len(hits) == 1 else None


def _split_kv(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``key=value`` words out of ``words`` (order kept), skipping the values of 1-value options."""
    rest: list[str] = []
    kv: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--":
            rest += words[i:]
            break
        if w.startswith("-") and len(w) > 1 and "=" not in w:
            action = _option_action(parser, w)
            n = 0
            if action is not None:
                n = 1 if action.nargs is None else action.nargs if isinstance(action.nargs, int) else 0
            rest += words[i:i + 1 + n]
            i += 1 + n
            continue
        (kv if _KV_WORD.match(w) else rest).append(w)
        i += 1
    return rest, kv


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse with the order rule of the module docstring (argparse's intermixed parsing per subcommand)."""
    if parser is None:
        parser = build_parser()
    words = list(argv)
    debug = False
    while words and words[0] == "--debug":
        debug, words = True, words[1:]
    sub = _subcommand(parser, words[0]) if words else None
    if sub is None:  # no or unknown subcommand, -h, ...: argparse's own message
        return parser.parse_args(argv)
    kv_action = next((a for a in sub._actions if not a.option_strings and a.dest in _KV_DESTS), None)
    rest = words[1:]
    kv: list[str] = []
    if kv_action is not None:
        rest, kv = _split_kv(sub, rest)
        if kv and kv_action.nargs == "+":  # a required list: give argparse the words themselves
            rest, kv = rest + (["--"] if "--" not in rest else []) + kv, []
    args = sub.parse_intermixed_args(rest)
    if kv_action is not None and kv:
        setattr(args, kv_action.dest, kv + list(getattr(args, kv_action.dest) or []))
    args.command = words[0]
    args.debug = debug or args.debug
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LowshotError as e:
        if args.debug:
            raise
        print(f"lowshot: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowshot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
