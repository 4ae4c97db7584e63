"""``lowshot demo``: the quick start on Fashion-MNIST, end to end, in a few CPU minutes.

1. Negative-Margin: a small margin study (Conv4 + cosine head, ``MARGINS`` x ``SEEDS``, the recipe of
   ``configs/fashion_mnist/margin_study.yaml`` at a smaller budget) on the base classes 0-4; every
   (margin, seed) run is evaluated 5-way 1/5-shot on the novel classes 5-9 (NCM, seeded episodes)
   together with base accuracy and discriminability phi, and the table / figure show the mean
   +/- std over seeds, so the margin's effect is read against the seed-to-seed spread.
2. Decoupling: joint training on Fashion-MNIST-LT (imbalance 100), then cRT, tau-norm, LWS and NCM
   on the frozen representation, with many / medium / few accuracy.
3. The self-contained HTML report of everything above (with the margin figure and its error bars).

Budgets are set by ``DEMO_BUDGET`` below; ``quick=True`` is a seconds-long smoke test of the same
pipeline (numbers then mean little).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

CONFIGS = Path(__file__).resolve().parent / "configs"  # the repo's configs/ links here

# (sweep overrides, long-tail overrides, few-shot episodes)
DEMO_BUDGET: dict[str, tuple[list[str], list[str], int]] = {
    "full": (["train.epochs=2", "data.options={max_per_class: 600}", "val.every=2", "train.progress=false"],
             ["train.epochs=4", "train.progress=false"], 1000),
    "quick": (["train.epochs=1", "data.options={max_per_class: 60}", "val.every=0", "train.batch_size=32",
               "train.progress=false"],
              ["train.epochs=1", "train.max_steps_per_epoch=10", "train.batch_size=32", "train.progress=false"], 20),
}
SWEEP_RECIPE = "fashion_mnist/margin_study.yaml"
MARGINS = [-0.2, 0.0, 0.2]
SEEDS = [0, 1, 2]
PROTOCOLS = ["5x1", "5x5"]
STAGE2 = ("crt", "tau_norm", "lws", "ncm")


def _config(name: str) -> Path:
    """Recipe YAML shipped inside the package (so the demo works from any directory)."""
    path = CONFIGS / name
    if not path.is_file():  # pragma: no cover - broken install
        from .errors import ConfigError
        raise ConfigError(f"demo recipe {path} is missing from the installed package")
    return path


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, overrides: Sequence[str] = (),
             log: Any = print) -> dict[str, Any]:
    from .pipelines import sweep_with_summary
    from .config import load_config
    from .longtail.metrics import format_table
    from .longtail.stage2 import decouple
    from .report import build_report
    from .train import train

    from .report.figures import require_matplotlib
    require_matplotlib("lowshot demo (its report)")  # before minutes of training, not after
    out = Path(out_dir)
    sweep_over, lt_over, episodes = DEMO_BUDGET["quick" if quick else "full"]
    t0 = time.perf_counter()

    log(f"== 1/3 Negative-Margin study on Fashion-MNIST base classes: margins {MARGINS} x seeds {SEEDS} ==")
    points = sweep_with_summary(_config(SWEEP_RECIPE), {"head.margin": MARGINS}, out / "margin_sweep",
                                seeds=SEEDS, protocols=PROTOCOLS, episodes=episodes,
                                overrides=[*sweep_over, *overrides], log=_quiet_sweep(log))

    log("== 2/3 Decoupling on Fashion-MNIST-LT (imbalance factor 100) ==")
    lt_cfg = load_config(_config("fashion_mnist_lt/conv4_joint.yaml"), lt_over)
    lt_run = out / "longtail_joint"
    if (lt_run / "last.pt").is_file() and _finished(lt_run, lt_cfg.train.epochs):
        log(f"reusing finished joint run {lt_run}")
    else:
        train(lt_cfg, lt_run, resume=(lt_run / "last.pt").is_file(), overwrite=True, log=log)
    stage2 = {}
    for method in STAGE2:
        _, res = decouple(lt_run / "last.pt", method, log=lambda *_: None)
        stage2[method] = res
        log(f"  {method:9s} overall {res['metrics']['all']:.2f}  few {res['metrics']['few']:.2f}  "
            f"(joint {res['joint']['all']:.2f} / few {res['joint']['few']:.2f})")

    log("== 3/3 Report ==")
    html = build_report([out], out / "report")
    minutes = (time.perf_counter() - t0) / 60
    log("")
    log(f"Negative-Margin study ({len(SEEDS)} seeds per margin; base accuracy on held-out base images; "
        f"5-way few-shot on novel classes 5-9):")
    log((out / "margin_sweep" / "sweep.md").read_text().strip())
    log("")
    log("Decoupling on Fashion-MNIST-LT (balanced test set; groups by training count rank):")
    first = next(iter(stage2.values()))
    log(format_table([(f"joint ({first['joint_head']})", first["joint"])]
                     + [(m, r["metrics"]) for m, r in stage2.items()]))
    log(f"demo finished in {minutes:.1f} min; runs in {out}")
    log(f"HTML report: {html.resolve()}")
    return {"sweep": points, "stage2": stage2, "report": str(html)}


def _quiet_sweep(log: Any) -> Any:
    """The sweep's per-run lines without the per-epoch training log (27 runs would flood the terminal)."""
    def emit(msg: str) -> None:
        if msg.startswith(("[", "  novel")) or msg.startswith("\n#"):
            log(msg if not msg.startswith("\n#") else "")
    return emit


def _finished(run_dir: Path, epochs: int) -> bool:
    from .fileio import read_jsonl
    records = read_jsonl(run_dir / "metrics.jsonl")
    return bool(records) and records[-1]["epoch"] >= epochs
