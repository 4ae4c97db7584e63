"""Training throughput: ``lowshot train``'s step loop vs a bare PyTorch loop, side by side.

Both loops use the same model (``build_model`` from the same config and seed), the same uint8
images gathered from memory, the same batch augmentation on the training device, the same
optimiser and the same batch size. The bare loop has none of the trainer's bookkeeping (per-step
learning-rate schedule, on-device epoch statistics, deferred NaN check, progress/timing); the
ratio says what that bookkeeping costs. Target: ratio >= 0.95.

The trainer side is timed with its own ``epoch_seconds`` (the step loop only: no evaluation, no
checkpoint writing) on its second epoch, the bare loop after one warm-up pass; both end with a
device synchronisation. Runs alternate and the median of ``--repeats`` is reported, because other
processes share the CPU.

    python benchmarks/train_speed.py                                   # conv4, FMNIST 28 px, CPU
    python benchmarks/train_speed.py --backbone resnet12 --image-size 32 --batch-size 64 --steps 30
    python benchmarks/train_speed.py --device cuda --amp bf16 --channels-last --steps 300
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"


def make_config(args: argparse.Namespace):
    from lowshot.config import load_config
    ov = [f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}", f"train.device={args.device}",
          "train.epochs=2", f"train.max_steps_per_epoch={args.steps}", "train.progress=false",
          "val.every=0", "data.test_split=null", f"train.channels_last={str(args.channels_last).lower()}",
          "schedule.warmup_epochs=0"]
    if args.amp != "off":  # (YAML reads a bare `off` as false)
        ov.append(f"train.amp={args.amp}")
    if args.image_size:
        ov.append(f"data.image_size={args.image_size}")
    return load_config(args.config, ov + list(args.overrides))


def lowshot_loop(cfg, workdir: Path, i: int) -> float:
    """Seconds of the trainer's second (warm) epoch."""
    from lowshot.train import train
    train(cfg, workdir / f"run{i}", overwrite=True, log=lambda _m: None)
    from lowshot.fileio import read_jsonl
    return float(read_jsonl(workdir / f"run{i}" / "metrics.jsonl")[-1]["epoch_seconds"])


def bare_loop(cfg, steps: int) -> float:
    """The same work written as the shortest plain PyTorch loop; seconds of the timed pass."""
    from lowshot.models import build_model
    from lowshot.train import build_optimizer, load_split, make_transforms
    from lowshot.utils import resolve_device, seed_everything
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    ds = load_split(cfg, cfg.data.train_split)
    images, index_map = ds.tensor_source()  # type: ignore[misc]
    labels = ds.labels
    train_tf, _, _ = make_transforms(cfg, ds)
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    use_amp = amp is torch.bfloat16 or (amp is not None and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16 and device.type == "cuda")
    pin = device.type == "cuda"
    b = cfg.train.batch_size
    model.train()

    def run_pass() -> float:
        order = torch.randperm(len(ds))
        start = time.perf_counter()
        for s in range(steps):
            idx = order[s * b:(s + 1) * b]
            src = idx if index_map is None else index_map[idx]
            x, y = images[src], labels[idx]
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = train_tf(x)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=use_amp):
                loss = F.cross_entropy(model(x, y).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run_pass()  # warm-up (allocator, kernels)
    return run_pass()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="timed steps per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args(argv)
    cfg = make_config(args)
    from lowshot.train import load_split
    n = len(load_split(cfg, cfg.data.train_split))
    if n < args.steps * args.batch_size:
        print(f"need {args.steps * args.batch_size} training images for {args.steps} steps, have {n}", file=sys.stderr)
        return 2
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            ours.append(lowshot_loop(cfg, Path(tmp), i))
            bare.append(bare_loop(cfg, args.steps))
    images = args.steps * args.batch_size
    size = cfg.data.image_size or "native"
    print(f"device={args.device} threads={torch.get_num_threads()} backbone={args.backbone} image_size={size} "
          f"batch={args.batch_size} steps={args.steps} amp={args.amp} channels_last={args.channels_last} "
          f"repeats={args.repeats}")
    print("| loop | images/s (best) | images/s (median) |\n|---|---:|---:|")
    for name, times in (("lowshot train", ours), ("bare PyTorch", bare)):
        print(f"| {name} | {images / min(times):,.0f} | {images / statistics.median(times):,.0f} |")
    best, median = min(bare) / min(ours), statistics.median(bare) / statistics.median(ours)
    print(f"ratio lowshot/bare: best {best:.3f}, median {median:.3f}"
          "  (target >= 0.95; on a shared machine trust the best-of ratio)")
    print("seconds per repeat: lowshot " + " ".join(f"{t:.2f}" for t in ours)
          + " | bare " + " ".join(f"{t:.2f}" for t in bare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
