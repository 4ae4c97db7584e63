"""Stage-1 training: backbone + head on the base classes. Read it top to bottom.

``train(cfg)`` builds data, model and optimiser from the config, runs the epochs, evaluates at
epoch ends (base-class accuracy on held-out images, few-shot validation episodes), and writes the
run directory: ``config.yaml``, ``metrics.jsonl`` / ``metrics.csv``, ``last.pt``, ``best.pt``.
Every checkpoint holds what an exact resume needs (weights, optimiser, RNG, epoch, step, the
position inside the epoch), so ``train(cfg, run_dir, resume=True)`` continues bit-for-bit on CPU.

Launched by ``torchrun`` the same function trains with DistributedDataParallel: ``train.batch_size``
is the GLOBAL batch (each of the R processes takes ``batch_size / R`` samples of the shared global
draw), epoch metrics are reduced over processes, and only rank 0 writes files (docs/distributed.md).
The step loop never waits for the GPU except every ``train.nan_check_every`` steps and before saving.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write, save_checkpoint, write_text_atomic
from .config import Config, ScheduleConfig, apply_overrides, dump_yaml, to_dict
from .data import build_dataset
from .data.base import ImageDataset
from .distributed import (DistContext, all_gather_object, all_reduce, broadcast_buffers, convert_sync_batchnorm,
                          evaluate_fewshot, extract_features_distributed, init_distributed, is_distributed,
                          rank0_decides, rank0_first, shard_indices, shutdown)
from .errors import CheckpointError, ConfigError, DataError, LowshotError
from .data.loader import BatchLoader
from .models import Classifier, build_model
from .rundir import RunDirLock, clear_run_dir, inspect_new_run_dir, open_resume, remove_temp_leftovers
from .tblog import TensorBoardLog
from .utils import (append_jsonl, progress, read_jsonl, rng_state, seed_everything, set_rng_state,
                    truncate_jsonl)


class TrainingDiverged(LowshotError):
    """The loss, a weight, a buffer or an optimiser state became NaN/Inf; nothing diverged was saved,
    so the checkpoints on disk are the last good state."""


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
    train_tf = build_transform(True, size, ds.channels, mean, std, crop_scale=crop, flip=a.flip, jitter=a.jitter,
                               affine=dataclasses.asdict(a.affine))
    test_tf = build_transform(False, size, ds.channels, mean, std)
    meta = {"channels": ds.channels, "image_size": size, "mean": mean, "std": std,
            "preprocess": dict(ds.preprocess)}
    return train_tf, test_tf, meta


@torch.no_grad()
def accuracy(model: Classifier, ds: ImageDataset, transform: Callable, device: torch.device,
             batch_size: int) -> float:
    """Top-1 accuracy (percent) of the model's own head, no margins (eval mode).

    Under DDP each process scores a contiguous block of ``ds`` and the counts are summed; the
    correct count stays on the device until the end (one sync, not one per batch).
    """
    model.eval()
    part = ds.subset(list(shard_indices(len(ds)))) if is_distributed() else ds
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(part, batch_size, pin_memory=device.type == "cuda"):
        logits = model(transform(x.to(device, non_blocking=True)))
        correct += (logits.argmax(1) == y.to(device, non_blocking=True)).sum()
    model.train()
    return 100.0 * int(all_reduce(correct)) / max(1, len(ds))


def held_out_key(cfg: Config) -> str:
    """Name of the per-epoch accuracy on ``data.test_split`` in metrics.jsonl.

    ``base_acc`` when that split holds held-out images of the base classes (few-shot configs:
    ``base_test``), else ``<split>_acc`` (``val_acc`` for the long-tail configs, ``test_acc`` ...).
    Readers (report) accept any of them: ``lowshot.report.build.held_out_acc``.
    """
    split = cfg.data.test_split or ""
    if split.startswith("base"):
        return "base_acc"
    return "train_split_acc" if split == "train" else f"{split}_acc"


def fewshot_validation(model: Classifier, ds: ImageDataset, transform: Callable, cfg: Config,
                       device: torch.device) -> dict[str, float]:
    v = cfg.val
    from .distributed import is_main
    feats, labels = extract_features_distributed(model.backbone, ds, transform, cfg.train.eval_batch_size, device,
                                                 channels_last=cfg.train.channels_last,
                                                 show_progress=cfg.train.progress and is_main(),
                                                 desc=f"val features ({len(ds)} images)")
    groups = ds.sample_groups(v.within) if v.within else None   # e.g. Omniglot: episodes within one alphabet
    res = evaluate_fewshot(feats, labels, way=v.way, shot=v.shot, query=v.query, episodes=v.episodes,
                           method=v.method, seed=v.seed, device=device, groups=groups,
                           **_fewshot_method_kwargs(cfg, v.method, v.options))
    return {"val_mean": float(res["mean"]), "val_ci95": float(res["ci95"])}


def _fewshot_method_kwargs(cfg: Config, method: str, options: dict[str, Any]) -> dict[str, Any]:
    from .fewshot import method_kwargs_for_head
    return method_kwargs_for_head(cfg.head.name, method, options)


def write_metrics_csv(run_dir: Path, records: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def resolve_run_dir(cfg: Config, run_dir: str | Path | None) -> Path:
    return Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name


def check_protocol(ds: ImageDataset, way: int, shot: int, query: int, keys: str, split: str) -> None:
    """Refuse an episode protocol the split cannot serve, before any run directory exists
    (the same check ``sample_episodes`` makes when the episodes are drawn)."""
    from .fewshot import sample_episodes
    try:
        sample_episodes(ds.labels, way=way, shot=shot, query=query, episodes=1, seed=0,
                        class_names=list(ds.class_names))
    except DataError as e:
        raise ConfigError(f"config keys {keys}: {way}-way {shot}-shot episodes with {query} queries do not fit "
                          f"split {split!r} ({ds.num_classes} classes): {e}") from None


def check_method(cfg: Config, method: str, options: dict[str, Any], section: str) -> None:
    """Build the few-shot method once: an unknown name or option must not surface after an epoch."""
    from .fewshot.evaluators import create_method
    try:
        create_method(method, **_fewshot_method_kwargs(cfg, method, options))
    except ConfigError as e:
        raise ConfigError(f"config key '{section}.method' / '{section}.options': {e}") from None



def build_train_sampler(cfg: Config, labels: torch.Tensor, num_replicas: int = 1, rank: int = 0) -> Any:
    """The training sampler; under DDP every rank takes every R-th position of one shared draw."""
    from .longtail.samplers import SAMPLERS, build_sampler
    t = cfg.train
    kw = dict(t.sampler_kwargs)
    clash = sorted({"seed", "num_replicas", "rank"} & set(kw))
    if clash:
        raise ConfigError(f"config key 'train.sampler_kwargs' must not set {', '.join(clash)} "
                          f"(the seed is train.seed; ranks come from torchrun)")
    if SAMPLERS.canonical(t.sampler) == "progressive":
        kw.setdefault("total_epochs", max(1, t.epochs))  # official linspace: the last epoch is class-balanced
    return build_sampler(t.sampler, labels, seed=t.seed, num_replicas=num_replicas, rank=rank, **kw)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of one process's augmentation/dropout stream (distinct per rank, reproducible)."""
    digest = hashlib.sha256(f"lowshot/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class FiniteGuard:
    """Deferred NaN/Inf check of the training loss.

    Each step records ``isfinite(loss)`` on the device (no sync); ``check`` looks at the recorded
    flags at once (one sync, one all-reduce under DDP so every rank stops together) and names the
    FIRST bad step. The trainer checks every ``train.nan_check_every`` steps before the backward
    pass, and always before writing a checkpoint, so no checkpoint ever holds diverged weights.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self.saved: tuple[int, int] | None = None  # (epoch as counted in messages, step) of the newest checkpoint

    def last_good(self) -> str:
        if self.saved is None:
            return "No checkpoint was written"
        return f"The last good checkpoint is {self.run_dir / 'last.pt'} (epoch {self.saved[0]}, step {self.saved[1]})"

    def record(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        self.pending.append((torch.isfinite(loss), loss, epoch, step))

    def __len__(self) -> int:
        return len(self.pending)

    def check(self) -> None:
        if not self.pending:
            return
        bad = all_reduce((~torch.stack([p[0] for p in self.pending])).to(torch.int32), "max").cpu()
        if bool(bad.any()):
            _, loss, epoch, step = self.pending[int(torch.nonzero(bad)[0])]
            value = float(loss)
            what = f"loss is {value}" if not math.isfinite(value) else "the loss of another process is not finite"
            raise TrainingDiverged(f"{what} at epoch {epoch}, step {step}; stopped. {self.last_good()} "
                                   f"(try a lower optim.lr or train.grad_clip)")
        self.pending.clear()

    def check_state(self, named: list[tuple[str, torch.Tensor]], epoch: int, step: int) -> None:
        """Every weight, buffer and optimiser state must be finite before a save: a finite loss can
        hide weights that overflowed in the last update or BatchNorm variances that reached inf."""
        if not named:
            return
        flags = torch.stack([torch.isfinite(t).all() for _, t in named])
        bad = all_reduce((~flags).to(torch.int32), "max").cpu()
        if bool(bad.any()):
            name = named[int(torch.nonzero(bad)[0])][0]
            raise TrainingDiverged(f"{name} is not finite at epoch {epoch}, step {step}; stopped without saving. "
                                   f"{self.last_good()} (try a lower optim.lr or train.grad_clip)")


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          overrides: Sequence[str] = (), log: Callable[[str], None] = print,
          stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train and return the final metrics record (also the run directory under ``'run_dir'``).

    A resume ignores ``cfg``: it continues ``run_dir/last.pt`` with the config stored there, after
    checking it against ``config.yaml`` / ``best.pt``; ``overrides`` may change only the keys of
    ``rundir.RESUME_SAFE_KEYS`` (``train.epochs=N`` extends a finished run). Without resume,
    ``overrides`` are applied to ``cfg``. Everything (config, registry names, data, protocols) is
    checked before the run directory is created or touched, and the directory is locked while
    training. ``stop_after_steps`` ends the run early after that many global steps (used by tests
    to simulate an interruption at a known point). Under ``torchrun`` every process calls this;
    only rank 0 logs and writes files, and all return the same record.
    """
    ckpt, changed = None, []
    if resume:  # read-only, so every process can do it before the process group exists
        if run_dir is None:
            raise ConfigError("resume needs the run directory to continue")
        run_dir, ckpt, cfg, changed = open_resume(run_dir, overrides)
    elif overrides:
        cfg = apply_overrides(cfg, overrides)
    tb = TensorBoardLog(cfg.train.tensorboard, cfg.train.nan_check_every)  # a missing package fails here
    ctx = init_distributed(cfg.train.device)
    lock = RunDirLock(resolve_run_dir(cfg, run_dir))
    try:
        return _train(cfg, lock, ckpt, changed, ctx, overwrite=overwrite, log=log, stop_after_steps=stop_after_steps,
                      tb=tb)
    finally:
        tb.close()
        lock.release()
        shutdown(ctx)


def _load_sets(cfg: Config) -> tuple[ImageDataset, ImageDataset | None, ImageDataset | None]:
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
        from .fewshot import sample_episodes
        v = cfg.val
        try:   # fail before the first epoch, not at its end (unknown key, no group with `way` classes)
            sample_episodes(val_set.labels, v.way, v.shot, v.query, 1, groups=val_set.sample_groups(v.within),
                            class_names=val_set.class_names)
        except DataError as e:
            raise ConfigError(f"config key 'val.within': {e}") from None
    return train_set, test_set, val_set


def _load_state(path: Path, ckpt: dict[str, Any], cfg: Config, model: Classifier, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler) -> None:
    """Restore a resumed run's state; weights of another architecture are one clear error, not a traceback."""
    parts = (("model", model.backbone, f"backbone {cfg.model.backbone!r}"),
             ("head", model.head, f"head {cfg.head.name!r}"), ("optimizer", optimizer, f"optimizer {cfg.optim.name!r}"))
    for key, module, what in parts:
        try:
            module.load_state_dict(ckpt[key])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            kind = "state" if key == "optimizer" else "weights"
            raise CheckpointError(f"cannot resume: the {key} {kind} in {path} do not fit the {what} built from "
                                  f"its config: {first}") from None
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def _claim_early(lock: RunDirLock, resume: bool, overwrite: bool) -> None:
    """Lock an existing run directory before the slow part, so a second training into it stops at once."""
    if lock.path.is_dir():
        lock.acquire()
    if not resume:
        inspect_new_run_dir(lock.path, overwrite)  # read-only: refuses a run directory in use by a finished run


def _claim(lock: RunDirLock, cfg: Config, ckpt: dict[str, Any] | None, changed: list[str], overwrite: bool,
           say: Callable[[str], None]) -> None:
    """Everything is validated: now create / lock / empty the run directory and write config.yaml."""
    path = lock.path
    if ckpt is None:
        path.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        state = inspect_new_run_dir(path, overwrite)  # again, under the lock
        if state in ("overwrite", "failed start"):
            if state == "failed start":
                say(f"note: {path} holds a run that stopped before its first last.pt; starting it again")
            clear_run_dir(path)
    else:
        lock.acquire()
    remove_temp_leftovers(path)  # temp files of writes killed midway (we hold the lock: no writer is active)
    if ckpt is not None and changed:
        say(f"resume with {', '.join(changed)}")
        ckpt["config"] = to_dict(cfg)  # checkpoint first: config.yaml and last.pt must agree for the next resume
        save_checkpoint(ckpt, path / "last.pt")
    if ckpt is None or changed or not (path / "config.yaml").is_file():
        write_text_atomic(path / "config.yaml", dump_yaml(cfg))


def _train(cfg: Config, lock: RunDirLock, ckpt: dict[str, Any] | None, changed: list[str], ctx: DistContext, *,
           overwrite: bool, log: Callable[[str], None], stop_after_steps: int | None,
           tb: TensorBoardLog) -> dict[str, Any]:
    t, device, world, main = cfg.train, ctx.device, ctx.world_size, ctx.is_main
    say = log if main else (lambda _msg: None)
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
    local_batch = t.batch_size // world
    run_dir = lock.path
    rank0_decides(lambda: _claim_early(lock, ckpt is not None, overwrite))
    seed_everything(t.seed)  # same on every rank: identical data views and model initialisation

    # -- data (rank 0 first: a download or cache build happens once); nothing is written before the
    #    data, the model and the protocols are known to work, so a failed start leaves no folder
    train_set, test_set, val_set = rank0_first(lambda: _load_sets(cfg))
    if ckpt is not None and list(ckpt["class_names"]) != list(train_set.class_names):
        raise CheckpointError(f"cannot resume {run_dir}: last.pt was trained on {len(ckpt['class_names'])} classes "
                              f"({', '.join(map(str, ckpt['class_names'][:3]))}, ...) but {cfg.data.name!r} split "
                              f"{cfg.data.train_split!r} now has {train_set.num_classes} "
                              f"({', '.join(map(str, train_set.class_names[:3]))}, ...)")
    if val_set is not None:
        v = cfg.val
        check_protocol(val_set, v.way, v.shot, v.query, "val.way/shot/query", cfg.data.val_split or "")
        check_method(cfg, v.method, v.options, "val")
    if ckpt is None and cfg.data.novel_split and cfg.eval.shots:
        e = cfg.eval
        novel = rank0_first(lambda: load_split(cfg, cfg.data.novel_split or ""))
        check_protocol(novel, e.way, max(e.shots), e.query, "eval.way/shots/query", cfg.data.novel_split)
        check_method(cfg, e.method, e.options, "eval")
        del novel
    train_tf, test_tf, data_meta = make_transforms(cfg, train_set)
    say(f"data: {cfg.data.name} {cfg.data.train_split}: {len(train_set)} images, {train_set.num_classes} classes"
        + (f"; {cfg.data.test_split}: {len(test_set)}" if test_set is not None else "")
        + (f"; {cfg.data.val_split}: {len(val_set)} ({val_set.num_classes} classes)" if val_set is not None else ""))

    # -- model, optimiser, sampler
    model = build_model(cfg, train_set.num_classes, train_set.channels, train_set.image_size).to(device)
    if world > 1 and t.sync_bn:
        model = convert_sync_batchnorm(model, device)  # type: ignore[assignment]
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    sampler = build_train_sampler(cfg, train_set.labels, world, ctx.rank)
    steps_per_epoch = sampler.num_samples // t.batch_size  # global: the same for any number of processes
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {len(train_set)} training images")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    use_amp = amp_dtype is not None and (device.type == "cuda"
                                         or (device.type == "cpu" and amp_dtype is torch.bfloat16))
    if amp_dtype is not None and not use_amp:
        say(f"note: train.amp={t.amp} is ignored on {device.type} (fp16 autocast needs CUDA; bf16 runs on cuda/cpu)")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype is torch.float16 and device.type == "cuda")
    say(f"model: {cfg.model.backbone} ({model.backbone.out_dim}-d) + {cfg.head.name} head "
        f"(margin {cfg.head.margin}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{steps_per_epoch} steps/epoch on {device}"
        + (f" x {world} processes ({local_batch} images each per step{', SyncBN' if t.sync_bn else ''})"
           if world > 1 else ""))

    # -- state (restored on resume; every rank loads the same checkpoint)
    epoch, step, epoch_step = 0, 0, 0
    stored = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    best: float | None = None
    if ckpt is not None:
        _load_state(run_dir / "last.pt", ckpt, cfg, model, optimizer, scaler)
        epoch, step, epoch_step = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]
    # -- all checks passed: only now the run directory is created (or emptied) and locked
    rank0_decides(lambda: _claim(lock, cfg, ckpt, changed, overwrite, say))
    if ckpt is not None:
        stored, best = dict(ckpt["epoch_stats"]), ckpt.get("best")
        if main:
            truncate_jsonl(run_dir / "metrics.jsonl",
                           [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["epoch"] <= epoch])
        say(f"resumed {run_dir} at epoch {epoch}, step {step}")
    if main:
        tb.open(run_dir, step, resumed=ckpt is not None)
    forward: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True)
    if t.compile:
        forward = torch.compile(forward)  # type: ignore[assignment]
    if world == 1:
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
    elif ckpt is not None and len(ckpt.get("rng_ranks") or []) == world:
        set_rng_state(ckpt["rng_ranks"][ctx.rank])
    else:  # per-rank augmentation streams (a resume with another process count reseeds from the step)
        seed_everything(rank_seed(t.seed, ctx.rank, step))

    # -- epoch statistics live on the device; only rank 0 carries the resumed partial epoch
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = torch.zeros((), dtype=acc_dtype, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, seconds = 0, float(stored["seconds"])
    if main:
        loss_sum += stored["loss_sum"]
        correct += int(stored["correct"])
        seen = int(stored["seen"])
    guard = FiniteGuard(run_dir)
    if ckpt is not None:
        guard.saved = (int(ckpt["epoch"]) + (1 if ckpt["epoch_step"] else 0), int(ckpt["step"]))

    def named_state() -> list[tuple[str, torch.Tensor]]:
        """Every floating tensor a checkpoint stores: weights, buffers (BatchNorm statistics), optimiser state."""
        out = [(f"{prefix}.{name}", v) for prefix, module in (("backbone", model.backbone), ("head", model.head))
               for name, v in itertools.chain(module.named_parameters(), module.named_buffers())]
        out += [(f"optimizer state {key} of parameter {i}", v) for i, st in enumerate(optimizer.state.values())
                for key, v in st.items() if isinstance(v, torch.Tensor)]
        return [(n, v.detach()) for n, v in out if v.is_floating_point()]

    def check_finite() -> None:
        """Collective: the loss of every recorded step and the current state must be finite."""
        guard.check()
        guard.check_state(named_state(), epoch if epoch_step == 0 else epoch + 1, step)

    def epoch_stats() -> dict[str, Any]:
        """Global sums over processes (collective)."""
        packed = torch.stack([loss_sum.detach().cpu().double(), correct.cpu().double(),
                              torch.tensor(float(seen), dtype=torch.float64)])
        total = all_reduce(packed).tolist()
        return {"loss_sum": total[0], "correct": int(total[1]), "seen": int(total[2]), "seconds": seconds}

    def save_state(paths: list[Path]) -> None:
        """Collective: check loss and state, reduce statistics, gather RNG streams; rank 0 writes."""
        check_finite()  # never replace the last finite last.pt / best.pt with a diverged state
        tb.flush()  # events up to this step are on disk before the checkpoint that a resume starts from
        stats = epoch_stats()
        streams = all_gather_object(rng_state()) if world > 1 else None
        if not main:
            return
        obj = {"kind": "train", "model": model.backbone.state_dict(), "head": model.head.state_dict(),
               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
               "rng": rng_state(), "epoch": epoch, "step": step, "epoch_step": epoch_step,
               "epoch_stats": stats, "best": best, "config": to_dict(cfg),
               "class_names": list(train_set.class_names), "data": data_meta}
        if streams is not None:
            obj.update(world_size=world, rng_ranks=streams)
        for path in paths:
            save_checkpoint(obj, path)
        guard.saved = (epoch if epoch_step == 0 else epoch + 1, step)

    last: dict[str, Any] = {}
    num_classes = train_set.num_classes
    lr = lr_at(step, steps_per_epoch, t.epochs, cfg.optim.lr, cfg.schedule)
    # step-driven backbone schedules (ResNet-12's DropBlock ramp) follow the global step, so resume is exact
    set_train_step = getattr(model.backbone, "set_train_step", None)
    forward.train()
    while epoch < t.epochs:
        # -- one epoch: the global order is fixed by (seed, epoch); this rank takes every R-th position
        sampler.set_epoch(epoch)
        order = list(sampler)[epoch_step * local_batch: steps_per_epoch * local_batch]
        batches = BatchLoader(train_set, local_batch, order, drop_last=True, num_workers=cfg.data.num_workers,
                              pin_memory=device.type == "cuda")
        tick = time.perf_counter()
        bar = progress(batches, total=len(batches), desc=f"epoch {epoch + 1}/{t.epochs}", enabled=t.progress and main)
        for x, y in bar:
            lr = lr_at(step, steps_per_epoch, t.epochs, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if set_train_step is not None:
                set_train_step(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = train_tf(x)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = forward(x, y)
                loss = F.cross_entropy(logits.float(), y)
            guard.record(loss.detach(), epoch + 1, step + 1)
            if len(guard) >= t.nan_check_every:
                guard.check()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step, epoch_step = step + 1, epoch_step + 1
            tb.step(step, loss, lr)
            loss_sum += loss.detach().to(acc_dtype) * y.shape[0]
            correct += (logits.detach()[:, :num_classes].argmax(1) == y).sum()
            seen += y.shape[0]
            if t.checkpoint_every and step % t.checkpoint_every == 0 and epoch_step < steps_per_epoch:
                seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                save_state([run_dir / "last.pt"])
            if stop_after_steps is not None and step >= stop_after_steps:
                guard.check()
                return {"stopped_at_step": step, "run_dir": str(run_dir)}
        check_finite()  # before evaluating and logging the epoch: a diverged epoch leaves no record
        seconds += time.perf_counter() - tick

        # -- epoch end: evaluate (without disturbing the training RNG), log, checkpoint
        stats = epoch_stats()
        epoch, epoch_step = epoch + 1, 0
        record: dict[str, Any] = {
            "epoch": epoch, "step": step, "lr": lr,
            "train_loss": stats["loss_sum"] / max(1, stats["seen"]),
            "train_acc": 100.0 * stats["correct"] / max(1, stats["seen"]),
            "epoch_seconds": round(stats["seconds"], 3),
        }
        with preserved_rng():
            broadcast_buffers(model)  # every rank evaluates the model rank 0 saves
            if test_set is not None:
                record[held_out_key(cfg)] = accuracy(model, test_set, test_tf, device, t.eval_batch_size)
            if val_set is not None and (epoch % cfg.val.every == 0 or epoch == t.epochs):
                record.update(fewshot_validation(model, val_set, test_tf, cfg, device))
        # one monitored metric for the whole run, so best.pt never compares different quantities:
        # few-shot validation accuracy when enabled, else held-out accuracy, else training loss
        monitor = "val_mean" if val_set is not None else held_out_key(cfg) if test_set is not None else "train_loss"
        score = record.get(monitor)
        if score is not None and monitor == "train_loss":
            score = -score
        record["best"] = score is not None and (best is None or score > best)
        if record["best"]:
            best = score
        loss_sum.zero_()
        correct.zero_()
        seen, seconds = 0, 0.0
        if main:
            append_jsonl(run_dir / "metrics.jsonl", record)
            write_metrics_csv(run_dir, read_jsonl(run_dir / "metrics.jsonl"))
            tb.epoch(record)
        save_state([run_dir / "best.pt", run_dir / "last.pt"] if record["best"] else [run_dir / "last.pt"])
        say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        last = record

    if not last and main:
        say(f"{run_dir} is finished (epoch {t.epochs} of {t.epochs}); nothing to do (train longer with "
            f"`lowshot train --resume {run_dir} train.epochs=N`)")
    if main and not (run_dir / "best.pt").exists():  # no epoch had the monitored metric
        data = (run_dir / "last.pt").read_bytes()
        atomic_write(run_dir / "best.pt", lambda f: f.write(data))
    return {**last, "run_dir": str(run_dir)}
