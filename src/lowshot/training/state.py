"""What a training checkpoint holds, and the guarantees of every save.

``TrainState`` is the whole mutable state of a run: model, optimiser, AMP scaler, the counters
(epoch, global step, position inside the epoch), the best monitored score and the partial sums of
the current epoch. ``state_dict()`` is the plain-data checkpoint dict (``weights_only``-loadable,
the layout every lowshot checkpoint has had), ``save(paths)`` writes it atomically and only after
every loss, weight, buffer and optimiser state was checked finite, ``restore(ckpt)`` is the one
function a resume uses to load it back (the RNG streams follow in ``restore_rng`` once the model is
wrapped).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import save_checkpoint
from ..distributed import all_gather_object, all_reduce
from ..errors import CheckpointError, LowshotError
from ..models import Classifier
from ..utils import rng_state, seed_everything, set_rng_state
from .setup import rank_seed


class TrainingDiverged(LowshotError):
    """The loss, a weight, a buffer or an optimiser state became NaN/Inf; nothing diverged was saved,
    so the checkpoints on disk are the last good state."""


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


class EpochMeter:
    """Loss and accuracy sums of the epoch in progress, kept on the device (no sync per step).

    Under DDP each process sums its own share; ``reduce`` adds them up (collective). A resumed
    partial epoch's sums are carried by rank 0 only, so the reduced totals count them once.
    """

    def __init__(self, device: torch.device) -> None:
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=self.dtype, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0
        self.seconds = 0.0

    def load(self, stored: dict[str, Any], carry_sums: bool) -> None:
        """Set the sums of a resumed partial epoch (``epoch_stats`` of a checkpoint); zero without ``carry_sums``."""
        self.reset()
        self.seconds = float(stored["seconds"])
        if carry_sums:
            self.loss_sum.fill_(stored["loss_sum"])
            self.correct.fill_(int(stored["correct"]))
            self.seen = int(stored["seen"])

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        self.loss_sum += loss.detach().to(self.dtype) * y.shape[0]
        self.correct += (logits.detach()[:, :num_classes].argmax(1) == y).sum()
        self.seen += y.shape[0]

    def reduce(self) -> dict[str, Any]:
        """Global sums over processes (collective), as stored in checkpoints under ``epoch_stats``."""
        packed = torch.stack([self.loss_sum.detach().cpu().double(), self.correct.cpu().double(),
                              torch.tensor(float(self.seen), dtype=torch.float64)])
        total = all_reduce(packed).tolist()
        return {"loss_sum": total[0], "correct": int(total[1]), "seen": int(total[2]), "seconds": self.seconds}

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen, self.seconds = 0, 0.0


@dataclass
class TrainState:
    """Everything a run changes while it trains, and its (de)serialisation.

    ``run_info`` is the plain data stored unchanged with every checkpoint: ``config`` (the resolved
    config dict), ``class_names`` and ``data`` (channels, size, normalisation, preprocessing).
    """

    model: Classifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meter: EpochMeter
    guard: FiniteGuard
    run_info: dict[str, Any]
    world: int = 1
    main: bool = True
    epoch: int = 0  # epochs completed
    step: int = 0  # global optimiser steps taken
    epoch_step: int = 0  # steps taken inside the epoch in progress
    best: float | None = None  # best monitored score so far (higher is better)

    @property
    def epoch_label(self) -> int:
        """The epoch as messages count it: the one in progress (1-based), else the last completed."""
        return self.epoch + 1 if self.epoch_step else self.epoch

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every floating tensor a checkpoint stores: weights, buffers (BatchNorm statistics), optimiser state."""
        model, optimizer = self.model, self.optimizer
        out = [(f"{prefix}.{name}", v) for prefix, module in (("backbone", model.backbone), ("head", model.head))
               for name, v in itertools.chain(module.named_parameters(), module.named_buffers())]
        out += [(f"optimizer state {key} of parameter {i}", v) for i, st in enumerate(optimizer.state.values())
                for key, v in st.items() if isinstance(v, torch.Tensor)]
        return [(n, v.detach()) for n, v in out if v.is_floating_point()]

    def check_finite(self) -> None:
        """Collective: the loss of every recorded step and the current state must be finite."""
        self.guard.check()
        self.guard.check_state(self.named_tensors(), self.epoch_label, self.step)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict (collective under DDP: epoch sums are reduced, RNG streams gathered)."""
        stats = self.meter.reduce()
        streams = all_gather_object(rng_state()) if self.world > 1 else None
        obj = {"kind": "train", "model": self.model.backbone.state_dict(), "head": self.model.head.state_dict(),
               "optimizer": self.optimizer.state_dict(),
               "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
               "rng": rng_state(), "epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
               "epoch_stats": stats, "best": self.best, "config": self.run_info["config"],
               "class_names": list(self.run_info["class_names"]), "data": self.run_info["data"]}
        if streams is not None:
            obj.update(world_size=self.world, rng_ranks=streams)
        return obj

    def save(self, paths: list[Path], before_write: Callable[[], None] | None = None) -> None:
        """Collective: check loss and state, build the dict; rank 0 writes each path atomically.

        Never replaces the last finite ``last.pt`` / ``best.pt`` with a diverged state.
        ``before_write`` runs after the check (the trainer flushes TensorBoard events there, so
        they are on disk before the checkpoint a resume starts from).
        """
        self.check_finite()
        if before_write is not None:
            before_write()
        obj = self.state_dict()
        if not self.main:
            return
        for path in paths:
            save_checkpoint(obj, path)
        self.guard.saved = (self.epoch_label, self.step)

    def restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Load a checkpoint back (every rank loads the same one); weights of another architecture
        are one clear error, not a traceback."""
        cfg = self.run_info["config"]
        parts = (("model", self.model.backbone, f"backbone {cfg['model']['backbone']!r}"),
                 ("head", self.model.head, f"head {cfg['head']['name']!r}"),
                 ("optimizer", self.optimizer, f"optimizer {cfg['optim']['name']!r}"))
        for key, module, what in parts:
            try:
                module.load_state_dict(ckpt[key])
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                kind = "state" if key == "optimizer" else "weights"
                raise CheckpointError(f"cannot resume: the {key} {kind} in {path} do not fit the {what} built from "
                                      f"its config: {first}") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.epoch_step = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]
        self.meter.load(dict(ckpt["epoch_stats"]), carry_sums=self.main)
        self.best = ckpt.get("best")
        self.guard.saved = (int(ckpt["epoch"]) + (1 if ckpt["epoch_step"] else 0), int(ckpt["step"]))


def restore_rng(ckpt: dict[str, Any] | None, rank: int, world: int, seed: int, step: int) -> None:
    """This process's RNG stream: the stored one on resume, else a per-rank stream under DDP.

    A single process keeps the stream ``seed_everything(train.seed)`` started; a resume with
    another process count reseeds every rank from the step.
    """
    if world == 1:
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
    elif ckpt is not None and len(ckpt.get("rng_ranks") or []) == world:
        set_rng_state(ckpt["rng_ranks"][rank])
    else:
        seed_everything(rank_seed(seed, rank, step))
