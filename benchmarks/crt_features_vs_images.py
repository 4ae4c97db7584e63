"""cRT on cached features vs on images through the frozen backbone: time and accuracy side by side.

    python benchmarks/crt_features_vs_images.py runs/longtail_fmnist/linear/last.pt [epochs=10]

Three runs on the same checkpoint, each writing its own checkpoint under a temporary directory:
features (the default; the first call extracts and caches the train/test features, the timing
shown is a warm second call, i.e. what every further stage-2 method pays), images with
``freeze_bn=true`` and images with ``freeze_bn=false`` (the official code's behaviour). It prints
wall-clock seconds of the whole call and of the classifier fit alone, each with its ratio to the
warm cached-feature run, plus the test metrics of each.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(__doc__)
        return 2
    from lowshot.config import parse_override
    from lowshot.longtail.metrics import format_table
    from lowshot.longtail.stage2 import decouple
    ckpt, extra = Path(args[0]), dict(parse_override(a) for a in args[1:])
    quiet = lambda _m: None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "last.pt"
        shutil.copyfile(ckpt, src)  # own run dir: the cold feature extraction is measured too
        runs = [("features (cold: + extraction)", {}), ("features (warm cache)", {}),
                ("images, freeze_bn=true", {"images": True, "freeze_bn": True}),
                ("images, freeze_bn=false", {"images": True, "freeze_bn": False})]
        rows, times = [], []
        for i, (label, opts) in enumerate(runs):
            t0 = time.perf_counter()
            _, res = decouple(src, "crt", out=Path(tmp) / f"crt{i}.pt", log=quiet, **{**extra, **opts})
            times.append((time.perf_counter() - t0, res["fit_seconds"], res["feature_seconds"]))
            rows.append((label, res["metrics"]))
        rows.insert(0, ("joint", res["joint"]))
    print(format_table(rows))
    print(f"\n{'cRT':<30} {'call s':>8} {'ratio':>7} {'fit s':>8} {'ratio':>7} {'extract s':>10}")
    (warm_call, warm_fit, _) = times[1]
    for (label, _), (call, fit, feats) in zip(runs, times):
        print(f"{label:<30} {call:8.1f} {call / warm_call:7.1f} {fit:8.2f} {fit / warm_fit:7.1f} {feats:10.1f}")
    print("call: the whole decouple() call; fit: training the classifier only; extract: feature extraction "
          "(train + test; images with freeze_bn=false re-extracts test with the updated backbone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
