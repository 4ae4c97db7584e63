"""Omniglot one-shot benchmark of a trained run: Lake et al.'s within-alphabet episodes.

Every episode draws all of its classes from ONE alphabet (``fewshot.protocol.evaluate_run(..., within="alphabet")``
feeding ``evaluate(..., groups=)``, the path of ``lowshot eval --within alphabet``),
which is harder than drawing them across alphabets: characters of one script look alike.
Prints a markdown table (method x protocol, mean ± ci95 in percent) and writes every number to
``--out`` (JSON). Features are cached in the run directory, so extra methods cost no forward pass.

    python benchmarks/omniglot_oneshot.py --checkpoint runs/omniglot_oneshot --split val
    python benchmarks/omniglot_oneshot.py --checkpoint runs/omniglot_oneshot --split novel \\
        --methods ncm finetune logreg --protocols 20x1 5x1 5x5 20x5

Choose recipes on ``--split val``; report ``--split novel`` once, for the chosen recipe.
Protocols whose way exceeds every alphabet's character count raise (e.g. 20-way on the val
alphabets uses Japanese (katakana) only: Tagalog has 17 characters).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROTOCOLS = ("20x1", "5x1", "5x5", "20x5")


def run(checkpoint: str, split: str, methods: list[str], protocols: list[str], episodes: int,
        query: int, seed: int) -> list[dict]:
    from lowshot.fewshot.protocol import evaluate_run
    from lowshot.inference import FrozenRun
    frozen = FrozenRun.open(checkpoint, show_progress=False)
    path = frozen.path
    out = []
    for method in methods:
        for proto in protocols:
            way, shot = (int(v) for v in proto.split("x"))
            r, = evaluate_run(frozen, split, way=way, shots=[shot], query=query, episodes=episodes, method=method,
                              seed=seed, within="alphabet")
            r.pop("accuracies")
            r.update(checkpoint=str(path), split=split)
            print(f"{method:9s} {way:2d}-way {shot}-shot within-alphabet {split}: "
                  f"{r['mean']:.2f} ± {r['ci95']:.2f}  ({r['seconds']:.1f} s)", flush=True)
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="run directory (best.pt, else last.pt) or checkpoint")
    ap.add_argument("--split", default="val", help="val to choose, novel to report (once)")
    ap.add_argument("--methods", nargs="+", default=["ncm"], help="ncm finetune logreg")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), help="WAYxSHOT, e.g. 20x1 5x5")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results JSON (default: RUN/oneshot_<split>_<methods>.json)")
    args = ap.parse_args(argv)
    results = run(args.checkpoint, args.split, args.methods, args.protocols, args.episodes, args.query, args.seed)
    run_dir = Path(results[0]["checkpoint"]).parent
    out = Path(args.out) if args.out else run_dir / f"oneshot_{args.split}_{'-'.join(args.methods)}.json"
    from lowshot.fileio import write_text_atomic
    write_text_atomic(out, json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
