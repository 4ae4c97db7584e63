"""Virtual Softmax vs plain softmax on balanced data (Chen, Deng & Shen, NeurIPS 2018).

The paper claims that adding one dynamic virtual negative class (logit ||W_y|| ||x_i||) makes
features more compact and lowers test error against plain softmax with the same network. This
script checks that claim where it can run on a CPU:

* Fashion-MNIST, all 10 classes, the full 60k training set, tested on the official 10k test split;
* Omniglot character classification: train on the ``base`` split (drawers 1-15 of every base
  character), test on ``base_test`` (drawers 16-20 of the same characters: held-out drawers).

Both heads use the same backbone (conv4), recipe and seeds: ``linear`` WITHOUT bias (the paper's
softmax, ``W x``) vs ``virtual_softmax`` (also ``W x`` at test time). The recipe below was fixed
before any test number was seen and is identical for both heads; nothing is tuned, and there is no
model selection (the final epoch is tested once), so the test split is touched once per run.

Per run it reports the test error (%) of the model's own head and two compactness measures of the
test features (the paper's mechanism): the mean angle (degrees) between a feature and its class's
mean direction, and phi = D_inter / D_intra of the L2-normalised features (lowshot.analysis,
Liu et al. 2020's discriminability). Table: mean +- std (sample std, ddof 1) over seeds.

    PYTHONPATH=src flock /tmp/lowshot-cpu.lock python3 scripts/virtual_softmax_study.py \
        --out runs/virtual_softmax_study --seeds 0 1 2

Runs are kept in ``--out``; a finished run (its ``result.json``) is reused, so an interrupted study
continues where it stopped. ``--table`` prints the table from the stored results without training.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

# The recipe, fixed before looking at any test number and shared by both heads.
COMMON = [
    "model.backbone=conv4",
    "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
    "schedule.name=cosine",
    "augment.crop_scale=[0.8,1.0]",
    "val.every=0", "data.val_split=null", "data.novel_split=null",
    "data.test_split=null",  # no per-epoch monitor on the test split: no selection on test
    "train.progress=false",
]
DATASETS: dict[str, list[str]] = {
    # 10 classes, 60k images, 28 px; one epoch of 468 steps (the study's budget is ~20 CPU minutes)
    "fashion_mnist": ["data.name=fashion_mnist", "data.train_split=train", "data.image_size=28",
                      "augment.flip=true", "train.epochs=1", "train.batch_size=128",
                      "schedule.warmup_epochs=0.2"],
    # 114 characters x 15 drawers (the small background zips), held-out drawers 16-20 for test
    "omniglot": ["data.name=omniglot", "data.root=/work/shared/data/omniglot", "data.train_split=base",
                 "data.image_size=28", "augment.flip=false", "train.epochs=20", "train.batch_size=64",
                 "schedule.warmup_epochs=1"],
}
TEST_SPLIT = {"fashion_mnist": "test", "omniglot": "base_test"}
HEADS: dict[str, list[str]] = {
    "softmax": ["head.name=linear", "head.kwargs={bias: false}"],
    "virtual_softmax": ["head.name=virtual_softmax"],
}


def compactness(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean angle (deg) of a feature to its class's mean direction, and phi of normalised features."""
    from lowshot.analysis.discriminability import class_statistics
    f = torch.nn.functional.normalize(features.double(), dim=1)
    classes, index = torch.unique(labels, return_inverse=True)
    centres = torch.zeros(len(classes), f.shape[1], dtype=torch.float64).index_add_(0, index, f)
    centres = torch.nn.functional.normalize(centres, dim=1)
    cos = (f * centres[index]).sum(1).clamp(-1.0, 1.0)
    angle = float(torch.rad2deg(torch.acos(cos)).mean())
    return {"intra_angle_deg": angle, "phi_normalized": float(class_statistics(features, labels, normalize=True).phi)}


def run_one(out: Path, dataset: str, head: str, seed: int, log: Any = print) -> dict[str, Any]:
    """Train one (dataset, head, seed) run, test its last epoch once; cached in result.json."""
    from lowshot.config import load_config
    from lowshot.inference import extract_features
    from lowshot.models import model_from_checkpoint
    from lowshot.checkpoint import load_checkpoint
    from lowshot.fileio import write_text_atomic
    from lowshot.train import load_split, make_transforms, train
    rdir = out / dataset / head / f"seed{seed}"
    done = rdir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = COMMON + DATASETS[dataset] + HEADS[head] + [f"train.seed={seed}", f"name={dataset}_{head}_{seed}"]
    cfg = load_config(None, overrides)
    train(cfg, rdir, overwrite=True, log=log)
    ckpt = load_checkpoint(rdir / "last.pt")
    model, cfg = model_from_checkpoint(ckpt)
    model.eval()
    test = load_split(cfg, TEST_SPLIT[dataset])
    _, test_tf, _ = make_transforms(cfg, test)
    feats, labels = extract_features(model.backbone, test, test_tf, 512)
    with torch.no_grad():
        pred = model.head(feats).argmax(1)
    result = {"dataset": dataset, "head": head, "seed": seed, "test_split": TEST_SPLIT[dataset],
              "test_images": len(test), "test_error": 100.0 * float((pred != labels).double().mean()),
              **compactness(feats, labels), "overrides": overrides}
    write_text_atomic(done, json.dumps(result, indent=1) + "\n")
    return result


def _ms(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: mean +- std over seeds of test error, intra-class angle and phi."""
    lines = ["| dataset | head | seeds | test error % | intra-class angle (deg) | phi (normalised) |",
             "|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        for head in HEADS:
            rows = [r for r in results if r["dataset"] == dataset and r["head"] == head]
            if not rows:
                continue
            seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
            lines.append(f"| {dataset} | {head} | {seeds} | {_ms([r['test_error'] for r in rows], 2)} | "
                         f"{_ms([r['intra_angle_deg'] for r in rows], 1)} | "
                         f"{_ms([r['phi_normalized'] for r in rows], 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/virtual_softmax_study", help="folder for the runs and results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--table", action="store_true", help="only print the table of the stored results")
    args = p.parse_args(argv)
    out = Path(args.out)
    results: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for head in HEADS:  # heads interleaved per seed, so a partial study stays paired
                if args.table:
                    path = out / dataset / head / f"seed{seed}" / "result.json"
                    if path.is_file():
                        results.append(json.loads(path.read_text()))
                    continue
                r = run_one(out, dataset, head, seed)
                print(f"{dataset} {head} seed {seed}: test error {r['test_error']:.2f}% "
                      f"angle {r['intra_angle_deg']:.1f} phi {r['phi_normalized']:.3f}", flush=True)
                results.append(r)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
