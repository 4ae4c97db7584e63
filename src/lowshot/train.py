"""Stage-1 training: backbone + head on the base classes. Read it top to bottom.

``train(cfg)`` builds data, model and optimiser from the config, runs the epochs, evaluates at
epoch ends (base-class accuracy on held-out images, few-shot validation episodes), and writes the
run directory: ``config.yaml``, ``metrics.jsonl`` / ``metrics.csv``, ``last.pt``, ``best.pt``.
Every checkpoint holds what an exact resume needs (weights, optimiser, RNG, epoch, step, the
position inside the epoch), so ``train(cfg, run_dir, resume=True)`` continues bit-for-bit on CPU.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint, write_text_atomic
from .config import Config, ScheduleConfig, config_from_checkpoint, dump_yaml, to_dict
from .data import build_dataset
from .data.base import ImageDataset
from .errors import ConfigError, DataError, LowshotError
from .features import extract_features
from .loader import BatchLoader
from .models import Classifier, build_model
from .utils import (append_jsonl, progress, read_jsonl, resolve_device, rng_state, seed_everything,
                    set_rng_state, truncate_jsonl)


class TrainingDiverged(LowshotError):
    """The loss became NaN/Inf; the last checkpoint on disk is the last good state."""


# ----------------------------------------------------------------------------- building blocks

def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, s: ScheduleConfig) -> float:
    """Learning rate for a global step: linear warmup, then cosine / multistep / constant."""
    total = max(1, epochs * steps_per_epoch)
    warm = int(round(s.warmup_epochs * steps_per_epoch))
    if step < warm:
        return base_lr * (s.warmup_start + (1.0 - s.warmup_start) * step / warm)
    if s.name == "cosine":
        t = (step - warm) / max(1, total - warm)
        return s.min_lr + 0.5 * (base_lr - s.min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))
    if s.name == "multistep":
        epoch = step / steps_per_epoch
        return base_lr * s.gamma ** sum(epoch >= m for m in s.milestones)
    return base_lr


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Evaluation must not shift the training RNG stream (keeps runs with/without eval comparable)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def load_split(cfg: Config, split: str) -> ImageDataset:
    d = cfg.data
    ds = build_dataset(d.name, split, root=d.root, image_size=d.image_size, download=d.download, **d.options)
    if len(ds) == 0:
        raise DataError(f"dataset {d.name!r} split {split!r} is empty")
    return ds


def make_transforms(cfg: Config, ds: ImageDataset) -> tuple[Callable, Callable, dict[str, Any]]:
    """Train / test batch transforms plus the plain-data description stored in checkpoints."""
    from .data.transforms import build_transform, default_stats
    mean, std = default_stats(cfg.data.name, ds.channels)
    mean = list(cfg.augment.mean or mean)
    std = list(cfg.augment.std or std)
    size = ds.image_size
    if size is None:
        raise DataError(f"dataset {cfg.data.name!r} has no fixed image size; set data.image_size")
    a = cfg.augment
    crop = tuple(a.crop_scale) if a.crop_scale is not None else None
    train_tf = build_transform(True, size, ds.channels, mean, std, crop_scale=crop, flip=a.flip, jitter=a.jitter)
    test_tf = build_transform(False, size, ds.channels, mean, std)
    meta = {"channels": ds.channels, "image_size": size, "mean": mean, "std": std}
    return train_tf, test_tf, meta


@torch.no_grad()
def accuracy(model: Classifier, ds: ImageDataset, transform: Callable, device: torch.device,
             batch_size: int) -> float:
    """Top-1 accuracy (percent) of the model's own head, no margins (eval mode)."""
    model.eval()
    correct = 0
    for x, y in BatchLoader(ds, batch_size):
        logits = model(transform(x.to(device)))
        correct += int((logits.argmax(1).cpu() == y).sum())
    model.train()
    return 100.0 * correct / max(1, len(ds))


def fewshot_validation(model: Classifier, ds: ImageDataset, transform: Callable, cfg: Config,
                       device: torch.device) -> dict[str, float]:
    from .fewshot import evaluate
    v = cfg.val
    feats, labels = extract_features(model.backbone, ds, transform, cfg.train.eval_batch_size, device)
    res = evaluate(feats, labels, way=v.way, shot=v.shot, query=v.query, episodes=v.episodes,
                   method=v.method, seed=v.seed, **_fewshot_method_kwargs(cfg, v.method, v.options))
    return {"val_mean": float(res["mean"]), "val_ci95": float(res["ci95"])}


def _fewshot_method_kwargs(cfg: Config, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning uses the training head's family (cosine-like -> cosine, else linear), margin 0."""
    kw = dict(options)
    if method == "finetune" and "head" not in kw:
        kw["head"] = "cosine" if cfg.head.name in ("cosine", "neg_cosine", "cosface", "normface", "arcface") \
            else "linear"
    return kw


def write_metrics_csv(run_dir: Path, records: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def prepare_run_dir(cfg: Config, run_dir: str | Path | None, resume: bool, overwrite: bool) -> Path:
    path = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name
    if resume:
        if not (path / "last.pt").is_file():
            raise ConfigError(f"cannot resume: {path / 'last.pt'} does not exist")
        return path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"run directory {path} is not empty: resume it with --resume {path}, "
                              f"choose another name=..., or pass --overwrite")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train and return the final metrics record (also the run directory under ``'run_dir'``).

    ``stop_after_steps`` ends the run early after that many global steps (used by tests to simulate
    an interruption at a known point).
    """
    # -- run directory and config (a resumed run uses the config stored in its checkpoint)
    run_dir = prepare_run_dir(cfg, run_dir, resume, overwrite)
    ckpt = load_checkpoint(run_dir / "last.pt") if resume else None
    if ckpt is not None:
        cfg = config_from_checkpoint(ckpt["config"])
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    t = cfg.train

    # -- data
    train_set = load_split(cfg, cfg.data.train_split)
    test_set = load_split(cfg, cfg.data.test_split) if cfg.data.test_split else None
    val_set = load_split(cfg, cfg.data.val_split) if cfg.data.val_split and cfg.val.every else None
    train_tf, test_tf, data_meta = make_transforms(cfg, train_set)
    log(f"data: {cfg.data.name} {cfg.data.train_split}: {len(train_set)} images, {train_set.num_classes} classes"
        + (f"; {cfg.data.test_split}: {len(test_set)}" if test_set is not None else "")
        + (f"; {cfg.data.val_split}: {len(val_set)} ({val_set.num_classes} classes)" if val_set is not None else ""))

    # -- model, optimiser, sampler
    model = build_model(cfg, train_set.num_classes, train_set.channels, train_set.image_size).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    from .longtail.samplers import build_sampler
    sampler = build_sampler(t.sampler, train_set.labels, seed=t.seed, **t.sampler_kwargs)
    steps_per_epoch = len(sampler) // t.batch_size  # type: ignore[arg-type]
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {len(train_set)} training images")
    forward = torch.compile(model) if t.compile else model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    use_amp = amp_dtype is not None and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype is torch.float16)
    log(f"model: {cfg.model.backbone} ({model.backbone.out_dim}-d) + {cfg.head.name} head "
        f"(margin {cfg.head.margin}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{steps_per_epoch} steps/epoch on {device}")

    # -- state (restored on resume)
    epoch, step, epoch_step = 0, 0, 0
    stats = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    best: float | None = None
    if ckpt is not None:
        model.backbone.load_state_dict(ckpt["model"])
        model.head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        epoch, step, epoch_step = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]
        stats, best = dict(ckpt["epoch_stats"]), ckpt.get("best")
        set_rng_state(ckpt["rng"])
        truncate_jsonl(run_dir / "metrics.jsonl",
                       [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["epoch"] <= epoch])
        log(f"resumed {run_dir} at epoch {epoch}, step {step}")

    def checkpoint(path: Path) -> None:
        save_checkpoint({
            "kind": "train", "model": model.backbone.state_dict(), "head": model.head.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": rng_state(), "epoch": epoch, "step": step, "epoch_step": epoch_step,
            "epoch_stats": dict(stats), "best": best, "config": to_dict(cfg),
            "class_names": list(train_set.class_names), "data": data_meta,
        }, path)

    last: dict[str, Any] = {}
    model.train()
    while epoch < t.epochs:
        # -- one epoch: the sampler's order for this epoch is fixed by (seed, epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[epoch_step * t.batch_size: steps_per_epoch * t.batch_size]
        batches = BatchLoader(train_set, t.batch_size, order, drop_last=True, num_workers=cfg.data.num_workers,
                              pin_memory=device.type == "cuda")
        tick = time.perf_counter()
        bar = progress(batches, total=len(batches), desc=f"epoch {epoch + 1}/{t.epochs}", enabled=t.progress)
        for x, y in bar:
            lr = lr_at(step, steps_per_epoch, t.epochs, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = train_tf(x)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = forward(x, y)
                loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. The last good "
                    f"checkpoint is {run_dir / 'last.pt'} (try a lower optim.lr or train.grad_clip)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step, epoch_step = step + 1, epoch_step + 1
            stats["loss_sum"] += float(loss.detach()) * y.numel()
            stats["correct"] += int((logits[:, : train_set.num_classes].argmax(1) == y).sum())
            stats["seen"] += y.numel()
            if t.checkpoint_every and step % t.checkpoint_every == 0 and epoch_step < steps_per_epoch:
                stats["seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                checkpoint(run_dir / "last.pt")
            if stop_after_steps is not None and step >= stop_after_steps:
                return {"stopped_at_step": step, "run_dir": str(run_dir)}
        stats["seconds"] += time.perf_counter() - tick

        # -- epoch end: evaluate (without disturbing the training RNG), log, checkpoint
        epoch, epoch_step = epoch + 1, 0
        record: dict[str, Any] = {
            "epoch": epoch, "step": step, "lr": lr,
            "train_loss": stats["loss_sum"] / max(1, stats["seen"]),
            "train_acc": 100.0 * stats["correct"] / max(1, stats["seen"]),
            "epoch_seconds": round(stats["seconds"], 3),
        }
        with preserved_rng():
            if test_set is not None:
                record["base_acc"] = accuracy(model, test_set, test_tf, device, t.eval_batch_size)
            if val_set is not None and (epoch % cfg.val.every == 0 or epoch == t.epochs):
                record.update(fewshot_validation(model, val_set, test_tf, cfg, device))
        score = record.get("val_mean", record.get("base_acc", -record["train_loss"]))
        record["best"] = best is None or score > best
        if record["best"]:
            best = score
        stats = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        append_jsonl(run_dir / "metrics.jsonl", record)
        write_metrics_csv(run_dir, read_jsonl(run_dir / "metrics.jsonl"))
        if record["best"]:
            checkpoint(run_dir / "best.pt")
        checkpoint(run_dir / "last.pt")
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        last = record

    if not (run_dir / "last.pt").exists():  # zero epochs: still leave a usable checkpoint
        checkpoint(run_dir / "last.pt")
    if not (run_dir / "best.pt").exists():
        shutil.copyfile(run_dir / "last.pt", run_dir / "best.pt")
    return {**last, "run_dir": str(run_dir)}
