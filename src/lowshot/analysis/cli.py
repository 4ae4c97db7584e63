"""``lowshot analyze`` and ``lowshot sweep`` (registered by ``lowshot.cli.build_parser``): thin, over
``lowshot.pipelines`` (analysis results plus the figures and tables ``lowshot.report`` draws)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_analyze(args: argparse.Namespace) -> int:
    splits = None if args.split == "both" else [args.split]  # both: novel only when the config has one
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "analysis"
    from ..pipelines import analyze_with_figures
    analyze_with_figures(args.checkpoint, splits, out_dir=out, projection=args.projection, classes=args.classes,
                         per_class=args.per_class, device=args.device, batch_size=args.batch_size)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..pipelines import sweep_with_summary
    from .grid import parse_sweep_args
    grid, fixed = parse_sweep_args(args.grid)
    sweep_with_summary(args.config, grid, args.out, shots=args.shots, episodes=args.episodes, method=args.method,
                       protocols=args.protocols, seeds=args.seeds, overrides=fixed)
    return 0


def register(subparsers: Any) -> None:
    from ..argtypes import int_at_least
    a = subparsers.add_parser("analyze", help="discriminability (phi) and 2-D projections of a checkpoint's features")
    a.add_argument("--checkpoint", required=True, help="a lowshot checkpoint (best.pt / last.pt)")
    a.add_argument("--split", choices=["base", "novel", "both"], default="both",
                   help="base: held-out base images (data.test_split, else the training split); "
                        "novel: data.novel_split; both (default): base + novel when configured")
    a.add_argument("--out", help="output folder for analysis.json and projections (default: CHECKPOINT_DIR/analysis)")
    a.add_argument("--projection", choices=["pca", "tsne"], help="also save a 2-D scatter (tsne needs scikit-learn)")
    a.add_argument("--classes", type=int_at_least(1), default=5, help="classes shown in the projection (default 5)")
    a.add_argument("--per-class", type=int_at_least(1), default=200, help="samples per class in the projection (default 200)")
    a.add_argument("--device", default="auto")
    a.add_argument("--batch-size", type=int_at_least(1), default=256)
    a.set_defaults(func=cmd_analyze)

    s = subparsers.add_parser(
        "sweep", help="train + evaluate a grid of configs (e.g. the margin sweep), resumable",
        description="Each KEY=V1,V2,... is a swept axis (values parsed like overrides; a value in [...] is one "
                    "value); a KEY=VALUE with a single value is a fixed override for every point. Re-running the "
                    "same command skips finished points and resumes interrupted ones.")
    s.add_argument("config", help="YAML config or packaged recipe name (e.g. fashion_mnist/conv4_neg_cosine)")
    s.add_argument("grid", nargs="+", metavar="KEY=V1,V2,...", help="e.g. head.margin=-0.3,-0.1,0,0.1")
    s.add_argument("--out", help="sweep folder (default: OUT_DIR/NAME_sweep from the config)")
    s.add_argument("--shots", type=int_at_least(1), nargs="+", help="few-shot shots to evaluate, eval.way-way each "
                   "(default: eval.shots)")
    s.add_argument("--protocols", nargs="+", metavar="WAYxSHOT[@KEY]",
                   help="novel-class protocols instead of --shots, e.g. 5x1 5x5 20x1@alphabet (@KEY: every "
                        "episode's classes from one group of class metadata KEY, e.g. one Omniglot alphabet)")
    s.add_argument("--seeds", type=int_at_least(0), nargs="+", metavar="SEED",
                   help="train every point once per train.seed (e.g. --seeds 0 1 2); tables and the figure "
                        "report mean ± std over seeds")
    s.add_argument("--episodes", type=int_at_least(1), help="episodes per evaluation (default: eval.episodes)")
    s.add_argument("--method", help="few-shot method (default: eval.method)")
    s.set_defaults(func=cmd_sweep)
