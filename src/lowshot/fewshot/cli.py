"""``lowshot eval``: few-shot meta-test of a checkpoint on a split, with cached features."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _given(value: Any, default: Any) -> Any:
    """The CLI value when one was given (0 stays 0 and is then rejected), else the config's."""
    return default if value is None else value


def default_eval_name(stem: str, split: str, method: str, *, way: int, shots: list[int], query: int,
                      episodes: int, seed: int, dataset: str | None = None,
                      options: dict[str, Any] | None = None) -> str:
    """``eval_<ckpt>_<split>_<method>_<protocol>.json``: another protocol never overwrites a result."""
    import hashlib
    where = f"{dataset}-{split}" if dataset else split
    name = (f"eval_{stem}_{where}_{method}_{way}way_{'-'.join(map(str, shots))}shot_{query}q_{episodes}ep"
            f"_seed{seed}")
    if options:
        digest = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name += f"_opt{digest}"
    return name + ".json"


def run_eval(checkpoint: str | Path, *, split: str | None = None, way: int | None = None,
             shots: list[int] | None = None, query: int | None = None, episodes: int | None = None,
             method: str | None = None, seed: int | None = None, options: dict[str, Any] | None = None,
             dataset: str | None = None, root: str | None = None, device: str = "auto",
             out: str | Path | None = None, log: Any = print) -> dict[str, Any]:
    """Evaluate; unspecified protocol values come from the checkpoint config's ``eval`` section."""
    from ..checkpoint import load_checkpoint
    from ..config import config_from_checkpoint
    from ..features import cached_split_features
    from ..utils import resolve_device
    from . import evaluate, format_table, method_kwargs_for_head
    from ..checkpoint import resolve_checkpoint_path
    ckpt_path = resolve_checkpoint_path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt.get("config"), dict):
        from ..errors import CheckpointError
        raise CheckpointError(f"{ckpt_path} has no 'config' entry (not a lowshot checkpoint?)")
    cfg = config_from_checkpoint(ckpt["config"])
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
    feats, labels, names = cached_split_features(ckpt_path, split, dataset=dataset, root=root, device=device)
    log(f"features: {split} split, {feats.shape[0]} images, {len(set(labels.tolist()))} classes, {feats.shape[1]}-d")
    results = []
    for shot in shots:
        res = evaluate(feats, labels, way=way, shot=shot, query=query, episodes=episodes, method=method, seed=seed,
                       class_names=names, device=resolve_device(device), **method_kwargs_for_head(cfg.head.name, method, opts))
        res = {k: v for k, v in res.items() if k != "accuracies"} | {"accuracies": list(map(float, res["accuracies"]))}
        results.append(res)
    log(format_table(results))
    record = {"checkpoint": str(ckpt_path), "split": split, "dataset": dataset or cfg.data.name, "results": results}
    out_path = Path(out) if out else ckpt_path.parent / default_eval_name(
        ckpt_path.stem, split, method, way=way, shots=shots, query=query, episodes=episodes, seed=seed,
        dataset=dataset, options=options)
    from ..checkpoint import write_text_atomic
    write_text_atomic(out_path, json.dumps(record, indent=1))
    log(f"wrote {out_path}")
    return record


def _cmd(args: argparse.Namespace) -> int:
    from ..config import parse_override
    options = dict(parse_override(o) for o in args.options)
    if args.generalized:   # base + novel classes scored together: lowshot.fewshot.generalized
        from .generalized import run_generalized_eval
        run_generalized_eval(args.checkpoint, way=args.way, shots=args.shot, query=args.query,
                             base_query=args.base_query, episodes=args.episodes, val_episodes=args.val_episodes,
                             calibrations=args.calibration or ["none"], method=args.method, seed=args.seed,
                             options=options, device=args.device, out=args.out)
        return 0
    if args.calibration or args.base_query is not None or args.val_episodes is not None:
        raise ConfigError("--calibration / --base-query / --val-episodes need --generalized")
    run_eval(args.checkpoint, split=args.split, way=args.way, shots=args.shot, query=args.query,
             episodes=args.episodes, method=args.method, seed=args.seed, options=options, dataset=args.dataset,
             root=args.root, device=args.device, out=args.out)
    return 0


def register(sub: Any) -> None:
    from ..cli import int_at_least
    p = sub.add_parser("eval", help="few-shot meta-test on frozen features (batched over episodes)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (uses best.pt)")
    p.add_argument("--split", help="dataset split (default: the config's data.novel_split)")
    p.add_argument("--dataset", help="evaluate on another registered dataset (e.g. cross-domain)")
    p.add_argument("--root", help="root of --dataset")
    p.add_argument("--way", type=int_at_least(2), help="classes per episode, >= 2 (default: eval.way)")
    p.add_argument("--shot", type=int_at_least(1), nargs="+", help="one or more shot counts, e.g. --shot 1 5")
    p.add_argument("--query", type=int_at_least(1), help="queries per class, >= 1 (default: eval.query)")
    p.add_argument("--episodes", type=int_at_least(1), help="episodes, >= 1 (default: eval.episodes)")
    p.add_argument("--method", help="finetune | ncm | logreg (see lowshot.fewshot.list_methods())")
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON (default: next to the checkpoint)")
    p.add_argument("--generalized", action="store_true",
                   help="score base and novel classes together (docs/generalized.md)")
    p.add_argument("--calibration", nargs="+", choices=["none", "tau_norm", "scale", "bias"],
                   help="with --generalized: calibrations to compare (default: none)")
    p.add_argument("--base-query", type=int_at_least(1), help="with --generalized: base queries per episode (default way*query)")
    p.add_argument("--val-episodes", type=int_at_least(1), help="with --generalized: validation episodes (default --episodes)")
    p.add_argument("options", nargs="*", help="method options as key=value, e.g. preset=bl0 head=linear")
    p.set_defaults(func=_cmd)
