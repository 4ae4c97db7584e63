"""Optional TensorBoard event files of a training run (``train.tensorboard: true``).

``metrics.jsonl`` stays the run's record; this mirrors it into ``RUN_DIR/tensorboard/`` so that
``tensorboard --logdir`` on a run, a sweep folder or any folder of runs shows (one run per run
directory, so one per sweep point):

* ``step/loss``, ``step/lr``: every optimiser step, at global step 1, 2, ... (the loss of that
  step's batch, on rank 0's share under torchrun; ``lr`` is the rate the step used);
* ``epoch/KEY``: every numeric KEY of each ``metrics.jsonl`` record (``train_loss``,
  ``train_acc``, ``base_acc``, ``val_mean``, ``val_ci95``, ``lr``, ``epoch``, ``epoch_seconds``,
  ``best`` as 0/1), at the record's ``step``.

Step losses stay on the device until a flush (every ``flush_every`` steps, before every
checkpoint, at the end), so logging adds one GPU sync per ``flush_every`` steps and none
otherwise. Events are on disk before each checkpoint is written, and a resumed run opens a new
event file in the same folder with ``purge_step`` = its first step: TensorBoard then drops what
the interrupted process logged after that checkpoint, so no step is shown twice. TensorBoard reads
a folder's files in name order and a name starts with the second its writer opened (then host and
pid, which sort arbitrarily), so a resume waits, at most a second or two, until its name sorts after
every file already there. When disabled
(the default) every method returns at once and tensorboard is never imported.
"""
from __future__ import annotations

import numbers
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

DIRNAME = "tensorboard"
INSTALL_HINT = "pip install 'lowshot[tensorboard]'"
PREFIX = "events.out.tfevents."
MAX_WAIT_S = 2.0  # a folder stamped further ahead is a skewed clock: waiting would not be bounded


def wait_until_names_sort_last(logdir: Path, max_wait_s: float = MAX_WAIT_S) -> None:
    """Sleep until the current whole second is past the stamp of every event file in ``logdir``.

    The stamp is the 10-digit ``%010d`` second after the prefix; a new writer's file then sorts
    after all of them whatever its host and pid. Stamps more than ``max_wait_s`` ahead of the clock
    are not waited for.
    """
    stamps = [int(part) for f in logdir.glob(PREFIX + "*")
              if (part := f.name[len(PREFIX):].split(".", 1)[0]).isdigit()]
    if not stamps:
        return
    until = max(stamps) + 1  # the first second whose stamp sorts after them all
    wait = until - time.time()
    if 0 < wait <= max_wait_s:
        time.sleep(wait)
        while time.time() < until:  # sleep may return a hair early
            time.sleep(0.01)


def summary_writer_class() -> type:
    """torch's SummaryWriter, or a one-line user error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # missing, or older than the 1.15 torch requires
        why = (str(e).splitlines() or ["import failed"])[0]
        raise ConfigError(f"config key 'train.tensorboard' needs the tensorboard package ({why}); "
                          f"install it with: {INSTALL_HINT}") from None
    return SummaryWriter


class TensorBoardLog:
    """Writer of one run's event files; a no-op unless ``enabled`` (and opened on rank 0)."""

    def __init__(self, enabled: bool, flush_every: int = 50) -> None:
        self.enabled = bool(enabled)
        self.flush_every = max(1, int(flush_every))
        self._writer: Any = None
        self._pending: list[tuple[int, torch.Tensor, float]] = []
        # checked here, before the trainer creates the run directory: a missing package leaves nothing behind
        self._writer_cls = summary_writer_class() if self.enabled else None

    def open(self, run_dir: str | Path, step: int, resumed: bool) -> None:
        """Start writing under ``run_dir/tensorboard``; ``step`` is the last step already done."""
        if self._writer_cls is None or self._writer is not None:
            return
        logdir = Path(run_dir) / DIRNAME
        if resumed:
            wait_until_names_sort_last(logdir)
        self._writer = self._writer_cls(log_dir=str(logdir),
                                        purge_step=step + 1 if resumed else None, flush_secs=30)

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """One optimiser step: ``step`` counts from 1; ``loss`` may stay on the device."""
        if self._writer is None:
            return
        self._pending.append((int(step), loss.detach(), float(lr)))
        if len(self._pending) >= self.flush_every:
            self._write_steps()

    def epoch(self, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record: each numeric value as ``epoch/KEY`` at the record's step."""
        if self._writer is None:
            return
        self._write_steps()
        at = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real):  # bool is Real: best -> 0/1
                self._writer.add_scalar(f"epoch/{key}", float(value), at)

    def flush(self) -> None:
        """Everything logged so far on disk (the trainer calls it before writing a checkpoint)."""
        if self._writer is None:
            return
        self._write_steps()
        self._writer.flush()

    def close(self) -> None:
        """Write what is pending and close (also after an error, e.g. a diverged loss: its NaN shows)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            self._write_steps(writer)
        finally:
            writer.close()

    def _write_steps(self, writer: Any = None) -> None:
        writer = writer if writer is not None else self._writer
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = torch.stack([p[1].float() for p in pending]).cpu().tolist()  # one sync for the batch
        for (step, _, lr), loss in zip(pending, losses, strict=True):
            writer.add_scalar("step/loss", loss, step)
            writer.add_scalar("step/lr", lr, step)
