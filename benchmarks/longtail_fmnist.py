"""Fashion-MNIST-LT (IF=100) decoupling benchmark: joint vs cRT / tau-norm / LWS / NCM, for a linear
and a Virtual Softmax joint classifier (Conv4, CPU). Prints markdown tables and writes them, with
every number, to ``OUT/results.md`` and ``OUT/results.json``.

    python benchmarks/longtail_fmnist.py                      # trains both runs, then stage 2
    python benchmarks/longtail_fmnist.py --reuse              # keep existing runs, redo stage 2
    python benchmarks/longtail_fmnist.py train.epochs=4       # training overrides for both runs

Stage 2 uses each run's ``last.pt`` (``best.pt`` is selected on the test split by the trainer's
monitor), its defaults (cRT/LWS on cached features, class-balanced; tau picked on the balanced val
split) and the rank-based many/medium/few groups (3/4/3 classes, see ``lowshot.longtail.metrics``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"linear": ROOT / "configs/fashion_mnist_lt/conv4_joint.yaml",
           "virtual_softmax": ROOT / "configs/fashion_mnist_lt/conv4_virtual_softmax.yaml"}
METHODS = ("crt", "tau_norm", "lws", "ncm")


def _fmt(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def markdown(title: str, rows: list[tuple[str, dict]]) -> str:
    lines = [f"**{title}**", "", "| method | overall | class-mean | many | medium | few |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, m in rows:
        lines.append(f"| {label} | {_fmt(m['all'])} | {_fmt(m['class_mean'])} | {_fmt(m['many'])} | "
                     f"{_fmt(m['medium'])} | {_fmt(m['few'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/longtail_fmnist", help="directory for the two runs and the tables")
    ap.add_argument("--reuse", action="store_true", help="skip training when OUT/<head>/last.pt exists")
    ap.add_argument("--heads", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("overrides", nargs="*", help="training overrides (key=value) for every run")
    args = ap.parse_args(argv)

    from lowshot.config import load_config
    from lowshot.longtail.stage2 import decouple, evaluate_checkpoint
    from lowshot.train import train

    out = Path(args.out)
    quiet = lambda _msg: None
    report: dict = {"overrides": args.overrides, "runs": {}}
    tables, t_all = [], time.perf_counter()
    for head in args.heads:
        run_dir, t0 = out / head, time.perf_counter()
        if not (args.reuse and (run_dir / "last.pt").is_file()):
            cfg = load_config(CONFIGS[head], [*args.overrides, "train.progress=false"])
            train(cfg, run_dir, overwrite=True, log=lambda m, h=head: print(f"[{h}] {m}", flush=True))
        t_train = time.perf_counter() - t0
        ckpt = run_dir / "last.pt"
        joint = evaluate_checkpoint(ckpt, "test", log=quiet)
        rows = [(f"joint ({head})", joint["metrics"])]
        info = {}
        t1 = time.perf_counter()
        for method in METHODS:
            _, res = decouple(ckpt, method, log=quiet)
            label = method if method != "tau_norm" else f"tau_norm (tau={res['info']['tau']:g}, val)"
            rows.append((label, res["metrics"]))
            info[method] = {"info": res["info"], "fit_seconds": res["fit_seconds"]}
        t_stage2 = time.perf_counter() - t1
        title = (f"Fashion-MNIST-LT IF=100, Conv4, joint head {head}; test 10 x 1000 images; "
                 f"groups {joint['thresholds']['description']}")
        tables.append(markdown(title, rows))
        print("\n" + tables[-1] + f"\n(train {t_train:.0f}s, stage 2 incl. features {t_stage2:.0f}s)", flush=True)
        report["runs"][head] = {"checkpoint": str(ckpt), "train_counts": joint["train_counts"],
                                "thresholds": joint["thresholds"], "train_seconds": round(t_train, 1),
                                "stage2_seconds": round(t_stage2, 1),
                                "rows": [{"method": k, **{g: m[g] for g in ("all", "class_mean", "many", "medium", "few")},
                                          "per_class": m["per_class"]} for k, m in rows],
                                "methods": info}
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n\n".join(tables) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\ntotal {report['total_seconds']:.0f}s; wrote {out / 'results.md'} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
