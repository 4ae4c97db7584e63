"""One epoch of training (``train_one_epoch``) and its evaluation (``evaluate_epoch``).

The step loop never waits for the GPU except every ``train.nan_check_every`` steps and before a
save; the epoch's loss and accuracy sums stay on the device until the epoch ends. Evaluation runs
under ``preserved_rng``, so runs with and without evaluation draw the same training batches.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data.base import ImageDataset
from ..distributed import all_reduce, broadcast_buffers, is_distributed, is_main, shard_indices
from ..fewshot import evaluate
from ..inference import extract_features_distributed
from ..data.loader import BatchLoader
from ..models import Classifier
from ..tblog import TensorBoardLog
from ..utils import progress, rng_state, set_rng_state
from .setup import _fewshot_method_kwargs, lr_at
from .state import TrainState


@dataclass
class EpochLoop:
    """What every epoch of a run uses and none changes."""

    cfg: Config
    forward: nn.Module  # the model as called for training (DDP / torch.compile wrapped)
    train_set: ImageDataset
    train_tf: Callable[[torch.Tensor], torch.Tensor]
    sampler: Any
    local_batch: int  # this process's share of train.batch_size
    steps_per_epoch: int  # global
    device: torch.device
    amp_dtype: torch.dtype | None
    use_amp: bool
    tb: TensorBoardLog
    run_dir: Path
    main: bool


@dataclass
class EpochStats:
    """What one ``train_one_epoch`` call did; ``record()`` is the start of its metrics.jsonl line."""

    epoch: int  # the epoch as counted in messages (1-based)
    step: int  # global step after the epoch
    lr: float  # learning rate of the last step
    train_loss: float | None  # None when stopped by train.max_steps (nothing is reduced then)
    train_acc: float | None
    seconds: float  # training time of the epoch, a resumed part included
    steps: int  # steps taken by this call
    stopped: bool = False  # train.max_steps was reached inside the epoch

    def record(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "lr": self.lr, "train_loss": self.train_loss,
                "train_acc": self.train_acc, "epoch_seconds": round(self.seconds, 3)}


def train_step(state: TrainState, loop: EpochLoop, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step at the schedule's rate for the global step; returns that rate."""
    t, device, optimizer, scaler = loop.cfg.train, loop.device, state.optimizer, state.scaler
    lr = lr_at(state.step, loop.steps_per_epoch, t.epochs, loop.cfg.optim.lr, loop.cfg.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # step-driven backbone schedules (ResNet-12's DropBlock ramp) follow the global step, so resume is exact
    set_train_step = getattr(state.model.backbone, "set_train_step", None)
    if set_train_step is not None:
        set_train_step(state.step)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x = loop.train_tf(x)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=loop.amp_dtype, enabled=loop.use_amp):
        logits = loop.forward(x, y)
        loss = F.cross_entropy(logits.float(), y)
    state.guard.record(loss.detach(), state.epoch + 1, state.step + 1)
    if len(state.guard) >= t.nan_check_every:
        state.guard.check()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if t.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), t.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    state.step, state.epoch_step = state.step + 1, state.epoch_step + 1
    loop.tb.step(state.step, loss, lr)
    state.meter.add(loss, logits, y, loop.train_set.num_classes)
    return lr


def train_one_epoch(state: TrainState, loop: EpochLoop) -> EpochStats:
    """Train the rest of epoch ``state.epoch + 1``, saving ``last.pt`` every ``train.checkpoint_every``
    steps; at its end the state is checked finite and the epoch counted complete.

    The global order is fixed by (seed, epoch) and this rank takes every R-th position, so a resume
    inside the epoch continues with exactly the batches that were next. Returns early (``stopped``,
    nothing saved since the last checkpoint, as if interrupted) once ``train.max_steps`` is reached.
    """
    t = loop.cfg.train
    loop.sampler.set_epoch(state.epoch)
    order = list(loop.sampler)[state.epoch_step * loop.local_batch: loop.steps_per_epoch * loop.local_batch]
    batches = BatchLoader(loop.train_set, loop.local_batch, order, drop_last=True, num_workers=loop.cfg.data.num_workers,
                          pin_memory=loop.device.type == "cuda")
    first, lr = state.step, lr_at(state.step, loop.steps_per_epoch, t.epochs, loop.cfg.optim.lr, loop.cfg.schedule)
    tick = time.perf_counter()
    bar = progress(batches, total=len(batches), desc=f"epoch {state.epoch + 1}/{t.epochs}",
                   enabled=t.progress and loop.main)
    for x, y in bar:
        lr = train_step(state, loop, x, y)
        if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.epoch_step < loop.steps_per_epoch:
            state.meter.seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            state.save([loop.run_dir / "last.pt"], before_write=loop.tb.flush)
        if t.max_steps is not None and state.step >= t.max_steps:
            state.guard.check()
            return EpochStats(state.epoch_label, state.step, lr, None, None,
                              state.meter.seconds + time.perf_counter() - tick, state.step - first, stopped=True)
    state.check_finite()  # before evaluating and logging the epoch: a diverged epoch leaves no record
    state.meter.seconds += time.perf_counter() - tick
    totals = state.meter.reduce()
    state.epoch, state.epoch_step = state.epoch + 1, 0
    seen = max(1, totals["seen"])
    return EpochStats(state.epoch, state.step, lr, totals["loss_sum"] / seen, 100.0 * totals["correct"] / seen,
                      totals["seconds"], state.step - first)


# ----------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Evaluation must not shift the training RNG stream (keeps runs with/without eval comparable)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


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


def fewshot_validation(model: Classifier, ds: ImageDataset, transform: Callable, cfg: Config,
                       device: torch.device) -> dict[str, float]:
    v = cfg.val
    feats, labels = extract_features_distributed(model.backbone, ds, transform, cfg.train.eval_batch_size, device,
                                                 channels_last=cfg.train.channels_last,
                                                 show_progress=cfg.train.progress and is_main(),
                                                 desc=f"val features ({len(ds)} images)")
    groups = ds.sample_groups(v.within) if v.within else None   # e.g. Omniglot: episodes within one alphabet
    res = evaluate(feats, labels, way=v.way, shot=v.shot, query=v.query, episodes=v.episodes,
                           method=v.method, seed=v.seed, device=device, groups=groups,
                           **_fewshot_method_kwargs(cfg, v.method, v.options))
    return {"val_mean": float(res["mean"]), "val_ci95": float(res["ci95"])}


@dataclass
class Evaluation:
    """The held-out and few-shot validation splits of a run (either may be None)."""

    cfg: Config
    transform: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    test_set: ImageDataset | None
    val_set: ImageDataset | None

    @property
    def monitor(self) -> str:
        """The one metric that selects best.pt for the whole run (never two different quantities):
        few-shot validation accuracy when enabled, else held-out accuracy, else training loss."""
        if self.val_set is not None:
            return "val_mean"
        return held_out_key(self.cfg) if self.test_set is not None else "train_loss"


def evaluate_epoch(state: TrainState, ev: Evaluation, record: dict[str, Any]) -> dict[str, Any]:
    """The epoch's metrics record: ``record`` (training statistics) plus held-out accuracy, few-shot
    validation (every ``val.every`` epochs and at the last) and ``best``; updates ``state.best``."""
    out = dict(record)
    cfg, epoch = ev.cfg, state.epoch
    with preserved_rng():
        broadcast_buffers(state.model)  # every rank evaluates the model rank 0 saves
        if ev.test_set is not None:
            out[held_out_key(cfg)] = accuracy(state.model, ev.test_set, ev.transform, ev.device,
                                              cfg.train.eval_batch_size)
        if ev.val_set is not None and (epoch % cfg.val.every == 0 or epoch == cfg.train.epochs):
            out.update(fewshot_validation(state.model, ev.val_set, ev.transform, cfg, ev.device))
    score = out.get(ev.monitor)
    if score is not None and ev.monitor == "train_loss":
        score = -score
    out["best"] = score is not None and (state.best is None or score > state.best)
    if out["best"]:
        state.best = score
    return out
