"""``lowshot eval``: few-shot meta-test of a checkpoint on a split, with cached features."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from ..errors import ConfigError
from ..inference import FrozenRun
from .api import default_eval_name, format_table, given as _given
from .protocol import evaluate_run


def run_eval(checkpoint: str | Path, *, split: str | None = None, way: int | None = None,
             shots: list[int] | None = None, query: int | None = None, episodes: int | None = None,
             method: str | None = None, seed: int | None = None, options: dict[str, Any] | None = None,
             dataset: str | None = None, root: str | None = None, device: str = "auto",
             out: str | Path | None = None, within: str | None = None, log: Any = print) -> dict[str, Any]:
    """Evaluate; unspecified protocol values come from the checkpoint config's ``eval`` section.

    ``within``: a class-metadata key of the dataset (e.g. ``alphabet`` for Omniglot): every episode
    draws its classes from one value of it (default ``eval.within``; ``""``/``"none"``: across groups).
    """
    run = FrozenRun.open(checkpoint, device=device, dataset_name=dataset, root=root)
    cfg, ckpt_path = run.config, run.path
    e = cfg.eval
    split = split or cfg.data.novel_split
    if not split:
        raise ConfigError("no split given and the checkpoint's config has no data.novel_split; pass --split")
    method = method or e.method
    opts = {**e.options, **(options or {})}
    way, query, episodes = _given(way, e.way), _given(query, e.query), _given(episodes, e.episodes)
    shots = list(_given(shots, e.shots))
    seed = _given(seed, e.seed)
    if way < 2:
        raise ConfigError(f"way must be >= 2 (a 1-way episode is always 100 % correct), got {way}")
    within = within_key(e.within if within is None else within)
    groups = run.groups(split, within)
    feats, labels = run.features(split)
    log(f"features: {split} split, {feats.shape[0]} images, {len(set(labels.tolist()))} classes, {feats.shape[1]}-d"
        + (f"; episodes within one {within} ({len(set(groups))} groups)" if groups is not None else ""))
    results = evaluate_run(run, split, way=way, shots=shots, query=query, episodes=episodes, method=method,
                           seed=seed, options=opts, within=within)
    log(format_table(results))
    record = {"checkpoint": str(ckpt_path), "split": split, "dataset": dataset or cfg.data.name, "within": within,
              "results": results}
    out_path = Path(out) if out else ckpt_path.parent / default_eval_name(
        ckpt_path.stem, split, method, way=way, shots=shots, query=query, episodes=episodes, seed=seed,
        dataset=dataset, options=options, within=within)
    write_text_atomic(out_path, json.dumps(record, indent=1))
    log(f"wrote {out_path}")
    return record


def within_key(value: str | None) -> str | None:
    """``--within`` / ``eval.within`` as a key or None (``""`` and ``"none"`` switch it off)."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return value.strip()


def _features_cmd(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``--features FILE``: bring-your-own features (lowshot.fewshot.feature_files)."""
    from .feature_files import run_features_eval, run_features_generalized
    given = [f for f, v in (("--split", args.split), ("--dataset", args.dataset), ("--root", args.root)) if v]
    if given:
        raise ConfigError(f"{given[0]} selects a checkpoint's dataset split; with --features the file is the data")
    if args.generalized:
        if args.within:
            raise ConfigError("--within is not supported with --generalized")
        if not args.base_features:
            raise ConfigError("--features with --generalized needs --base-features BASE.npz (held-out base-class "
                              "features; docs/generalized.md)")
        run_features_generalized(args.features, base_features=args.base_features,
                                 base_train_features=args.base_train_features, val_features=args.val_features,
                                 checkpoint=args.checkpoint, way=args.way, shots=args.shot, query=args.query,
                                 base_query=args.base_query, episodes=args.episodes, val_episodes=args.val_episodes,
                                 calibrations=args.calibration or ["none"], method=args.method, seed=args.seed,
                                 options=options, device=args.device, out=args.out)
        return 0
    extra = [f for f, v in (("--checkpoint", args.checkpoint), ("--base-features", args.base_features),
                            ("--base-train-features", args.base_train_features),
                            ("--val-features", args.val_features), ("--calibration", args.calibration),
                            ("--base-query", args.base_query), ("--val-episodes", args.val_episodes)) if v]
    if extra:
        raise ConfigError(f"{extra[0]} with --features is only for --generalized (the base classifier and its data)")
    run_features_eval(args.features, way=args.way, shots=args.shot, query=args.query, episodes=args.episodes,
                      method=args.method, seed=args.seed, options=options, within=within_key(args.within),
                      device=args.device, out=args.out)
    return 0


def _cmd(args: argparse.Namespace) -> int:
    from ..config import parse_override
    options = dict(parse_override(o) for o in args.options)
    if args.features:
        return _features_cmd(args, options)
    if not args.checkpoint:
        raise ConfigError("lowshot eval needs --checkpoint CKPT (a lowshot run) or --features FILE (.npz/.pt with "
                          "features and labels)")
    if args.base_features or args.base_train_features or args.val_features:
        raise ConfigError("--base-features / --base-train-features / --val-features go with --features --generalized")
    if args.generalized:   # base + novel classes scored together: lowshot.fewshot.generalized
        if args.within:
            raise ConfigError("--within is not supported with --generalized (base and novel classes are scored "
                              "together over all base classes)")
        from .protocol import run_generalized_eval
        run_generalized_eval(args.checkpoint, way=args.way, shots=args.shot, query=args.query,
                             base_query=args.base_query, episodes=args.episodes, val_episodes=args.val_episodes,
                             calibrations=args.calibration or ["none"], method=args.method, seed=args.seed,
                             options=options, device=args.device, out=args.out)
        return 0
    if args.calibration or args.base_query is not None or args.val_episodes is not None:
        raise ConfigError("--calibration / --base-query / --val-episodes need --generalized")
    run_eval(args.checkpoint, split=args.split, way=args.way, shots=args.shot, query=args.query,
             episodes=args.episodes, method=args.method, seed=args.seed, options=options, dataset=args.dataset,
             root=args.root, device=args.device, out=args.out, within=args.within)
    return 0


def register(sub: Any) -> None:
    from ..argtypes import int_at_least
    p = sub.add_parser("eval", help="few-shot meta-test on frozen features (batched over episodes)")
    p.add_argument("--checkpoint", help="checkpoint file or run directory (uses best.pt)")
    p.add_argument("--features", metavar="FILE",
                   help="evaluate a features file instead (.npz or .pt: features N x D, labels N, optional "
                        "class_names, group_<KEY>; docs/fewshot.md)")
    p.add_argument("--split", help="dataset split (default: the config's data.novel_split)")
    p.add_argument("--dataset", help="evaluate on another registered dataset (e.g. cross-domain)")
    p.add_argument("--root", help="root of --dataset")
    p.add_argument("--way", type=int_at_least(2), help="classes per episode, >= 2 (default: eval.way)")
    p.add_argument("--shot", type=int_at_least(1), nargs="+", help="one or more shot counts, e.g. --shot 1 5")
    p.add_argument("--query", type=int_at_least(1), help="queries per class, >= 1 (default: eval.query)")
    p.add_argument("--episodes", type=int_at_least(1), help="episodes, >= 1 (default: eval.episodes)")
    p.add_argument("--method", help="finetune | ncm | logreg (see lowshot.fewshot.list_evaluators())")
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON (default: next to the checkpoint)")
    p.add_argument("--within", metavar="KEY",
                   help="draw each episode's classes from one group of this class-metadata key, e.g. alphabet "
                        "(Lake et al.'s within-alphabet Omniglot protocol; default: eval.within; none: off)")
    p.add_argument("--generalized", action="store_true",
                   help="score base and novel classes together (docs/generalized.md)")
    p.add_argument("--calibration", nargs="+", choices=["none", "tau_norm", "scale", "bias"],
                   help="with --generalized: calibrations to compare (default: none)")
    p.add_argument("--base-query", type=int_at_least(1), help="with --generalized: base queries per episode (default way*query)")
    p.add_argument("--val-episodes", type=int_at_least(1), help="with --generalized: validation episodes (default --episodes)")
    p.add_argument("--base-features", metavar="FILE",
                   help="with --features --generalized: held-out base-class features (base queries)")
    p.add_argument("--base-train-features", metavar="FILE",
                   help="with --features --generalized: base training features (NCM base classifier, method ncm)")
    p.add_argument("--val-features", metavar="FILE",
                   help="with --features --generalized: val-class features (calibration episodes)")
    p.add_argument("options", nargs="*", help="method options as key=value, e.g. preset=bl0 head=linear")
    p.set_defaults(func=_cmd)
