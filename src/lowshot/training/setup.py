"""Building blocks of a training run: data, transforms, optimiser, sampler, schedule, start-up checks.

Everything here is checked before the run directory is created, so a bad config, name or protocol
fails with one line and leaves no folder behind.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, ScheduleConfig, TrainConfig
from ..data import build_dataset
from ..data.base import ImageDataset
from ..errors import ConfigError, DataError
from ..fileio import write_text_atomic


def check_train_config(t: TrainConfig, world: int) -> None:
    """Value checks that need the process count, made before anything is loaded."""
    if t.epochs < 1:
        raise ConfigError(f"config key 'train.epochs': must be >= 1, got {t.epochs} (a run of no epochs "
                          f"would save an untrained model)")
    if t.batch_size % world:
        raise ConfigError(f"config key 'train.batch_size': the global batch {t.batch_size} must be divisible by "
                          f"the {world} processes (each takes batch_size / processes samples)")
    if t.nan_check_every < 1:
        raise ConfigError("config key 'train.nan_check_every' must be >= 1")
    if t.checkpoint_every < 0:
        raise ConfigError("config key 'train.checkpoint_every' must be >= 0 (0: only at epoch ends)")


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


def amp_settings(t: TrainConfig, device: torch.device,
                 say: Callable[[str], None]) -> tuple[torch.dtype | None, bool, torch.amp.GradScaler]:
    """``(autocast dtype, autocast on, GradScaler)``: fp16 needs CUDA (and a scaler), bf16 also runs on CPU."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    use_amp = amp_dtype is not None and (device.type == "cuda"
                                         or (device.type == "cpu" and amp_dtype is torch.bfloat16))
    if amp_dtype is not None and not use_amp:
        say(f"note: train.amp={t.amp} is ignored on {device.type} (fp16 autocast needs CUDA; bf16 runs on cuda/cpu)")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype is torch.float16 and device.type == "cuda")
    return amp_dtype, use_amp, scaler


def load_split(cfg: Config, split: str) -> ImageDataset:
    d = cfg.data
    ds = build_dataset(d.name, split, root=d.root, image_size=d.image_size, download=d.download, **d.options)
    if len(ds) == 0:
        raise DataError(f"dataset {d.name!r} split {split!r} is empty")
    return ds


def load_sets(cfg: Config) -> tuple[ImageDataset, ImageDataset | None, ImageDataset | None]:
    """Training split, held-out split of the same classes (or None), few-shot validation split (or None)."""
    d = cfg.data
    train_set = load_split(cfg, d.train_split)
    test_set = load_split(cfg, d.test_split) if d.test_split else None
    if test_set is not None and list(test_set.class_names) != list(train_set.class_names):
        # base accuracy scores the trained head on held-out images: the label ids must mean the same classes
        raise ConfigError(f"config key 'data.test_split': split {d.test_split!r} has {test_set.num_classes} classes "
                          f"that are not the {train_set.num_classes} classes of data.train_split={d.train_split!r} "
                          f"(held-out images must come from the training classes; set data.test_split=null)")
    val_set = load_split(cfg, d.val_split) if d.val_split and cfg.val.every else None
    if val_set is not None and cfg.val.within:
        from ..fewshot import sample_episodes
        v = cfg.val
        try:   # fail before the first epoch, not at its end (unknown key, no group with `way` classes)
            sample_episodes(val_set.labels, v.way, v.shot, v.query, 1, groups=val_set.sample_groups(v.within),
                            class_names=val_set.class_names)
        except DataError as e:
            raise ConfigError(f"config key 'val.within': {e}") from None
    return train_set, test_set, val_set


def make_transforms(cfg: Config, ds: ImageDataset) -> tuple[Callable, Callable, dict[str, Any]]:
    """Train / test batch transforms plus the plain-data description stored in checkpoints."""
    from ..data.transforms import build_transform, default_stats
    mean, std = default_stats(cfg.data.name, ds.channels)
    mean = list(cfg.augment.mean or mean)
    std = list(cfg.augment.std or std)
    size = ds.image_size
    if size is None:
        raise DataError(f"dataset {cfg.data.name!r} has no fixed image size; set data.image_size")
    a = cfg.augment
    crop = tuple(a.crop_scale) if a.crop_scale is not None else None
    train_tf = build_transform(True, size, ds.channels, mean, std, crop_scale=crop, flip=a.flip, jitter=a.jitter,
                               affine=dataclasses.asdict(a.affine))
    test_tf = build_transform(False, size, ds.channels, mean, std)
    meta = {"channels": ds.channels, "image_size": size, "mean": mean, "std": std,
            "preprocess": dict(ds.preprocess)}
    return train_tf, test_tf, meta


def _fewshot_method_kwargs(cfg: Config, method: str, options: dict[str, Any]) -> dict[str, Any]:
    from ..fewshot import method_kwargs_for_head
    return method_kwargs_for_head(cfg.head.name, method, options)


def check_protocol(ds: ImageDataset, way: int, shot: int, query: int, keys: str, split: str) -> None:
    """Refuse an episode protocol the split cannot serve, before any run directory exists
    (the same check ``sample_episodes`` makes when the episodes are drawn)."""
    from ..fewshot import sample_episodes
    try:
        sample_episodes(ds.labels, way=way, shot=shot, query=query, episodes=1, seed=0,
                        class_names=list(ds.class_names))
    except DataError as e:
        raise ConfigError(f"config keys {keys}: {way}-way {shot}-shot episodes with {query} queries do not fit "
                          f"split {split!r} ({ds.num_classes} classes): {e}") from None


def check_method(cfg: Config, method: str, options: dict[str, Any], section: str) -> None:
    """Build the few-shot method once: an unknown name or option must not surface after an epoch."""
    from ..fewshot.evaluators import create_evaluator
    try:
        create_evaluator(method, **_fewshot_method_kwargs(cfg, method, options))
    except ConfigError as e:
        raise ConfigError(f"config key '{section}.method' / '{section}.options': {e}") from None


def build_train_sampler(cfg: Config, labels: torch.Tensor, num_replicas: int = 1, rank: int = 0) -> Any:
    """The training sampler; under DDP every rank takes every R-th position of one shared draw."""
    from ..data.samplers import build_sampler
    t = cfg.train
    kw = dict(t.sampler_kwargs)
    clash = sorted({"seed", "num_replicas", "rank"} & set(kw))
    if clash:
        raise ConfigError(f"config key 'train.sampler_kwargs' must not set {', '.join(clash)} "
                          f"(the seed is train.seed; ranks come from torchrun)")
    # horizon: for a sampler that needs it (progressive: official linspace, the last epoch is class-balanced)
    return build_sampler(t.sampler, labels, seed=t.seed, num_replicas=num_replicas, rank=rank,
                         horizon=max(1, t.epochs), **kw)


def steps_per_epoch_of(t: TrainConfig, sampler: Any, num_images: int) -> int:
    """Global optimiser steps per epoch: the same for any number of processes."""
    steps = sampler.num_samples // t.batch_size
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {num_images} training images")
    return steps


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of one process's augmentation/dropout stream (distinct per rank, reproducible)."""
    digest = hashlib.sha256(f"lowshot/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def resolve_run_dir(cfg: Config, run_dir: str | Path | None) -> Path:
    return Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name


def write_metrics_csv(run_dir: Path, records: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())
