"""``lowshot`` command line: each subcommand parses, builds a config, calls the library.

User mistakes (LowshotError) print one line and exit 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

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
            raise LowshotError("lowshot train needs a CONFIG file (e.g. configs/fashion_mnist/conv4_neg_cosine.yaml) "
                               "or --resume RUN_DIR")
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
        print(f"downloaded to {data.download_dataset(args.name, root=args.root)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_safetensors, load_checkpoint
    path = export_safetensors(load_checkpoint(args.checkpoint), args.out)
    print(f"wrote {path} (backbone as model.*, head as head.*)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out_dir=args.out, quick=args.quick, overrides=args.overrides)
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowshot", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train backbone + head on the base classes")
    t.add_argument("config", nargs="?", help="YAML config (configs/...)")
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
    e.add_argument("--batch-size", type=int, default=256)
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

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def _register_extra() -> None:
    """Subcommands defined next to their feature (eval, decouple, analyze, sweep, report)."""
    from . import cli_extra
    _EXTRA_COMMANDS.extend(cli_extra.registrars())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _EXTRA_COMMANDS:
        _register_extra()
    parser = build_parser()
    args = parser.parse_args(argv)
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
