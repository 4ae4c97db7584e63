"""Stage-1 training: backbone + head on the base classes. Read it top to bottom.

``train(cfg)`` builds data, model and optimiser from the config, runs the epochs, evaluates at
epoch ends (base-class accuracy on held-out images, few-shot validation episodes), and writes the
run directory: ``config.yaml``, ``metrics.jsonl`` / ``metrics.csv``, ``last.pt``, ``best.pt``.
Every checkpoint holds what an exact resume needs (weights, optimiser, RNG, epoch, step, the
position inside the epoch), so ``train(cfg, run_dir, resume=True)`` continues bit-for-bit on CPU.

Launched by ``torchrun`` the same function trains with DistributedDataParallel: ``train.batch_size``
is the GLOBAL batch (each of the R processes takes ``batch_size / R`` samples of the shared global
draw), epoch metrics are reduced over processes, and only rank 0 writes files (docs/distributed.md).

The parts live in ``lowshot.training``: ``setup`` (data, optimiser, sampler, schedule, checks),
``state`` (``TrainState``: checkpoint dict, atomic finite-only save, restore; ``FiniteGuard``) and
``epoch`` (``train_one_epoch``, ``evaluate_epoch``). This module is the driver.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .config import Config, apply_overrides, dump_yaml, to_dict
from .data.base import ImageDataset
from .distributed import (DistContext, convert_sync_batchnorm, init_distributed, rank0_decides, rank0_first,
                          shutdown)
from .errors import CheckpointError, ConfigError
from .fileio import append_jsonl, atomic_write, read_jsonl, truncate_jsonl, write_text_atomic
from .models import Classifier, build_model
from .rundir import RunDirLock, clear_run_dir, inspect_new_run_dir, open_resume, remove_temp_leftovers
from .tblog import TensorBoardLog
from .training.epoch import (EpochLoop, EpochStats, Evaluation, accuracy, evaluate_epoch, fewshot_validation,
                             held_out_key, preserved_rng, train_one_epoch)
from .training.setup import (_fewshot_method_kwargs, amp_settings, build_optimizer, build_train_sampler,
                             check_method, check_protocol, check_train_config, lr_at, load_sets, load_split,
                             make_transforms, rank_seed, resolve_run_dir, steps_per_epoch_of, write_metrics_csv)
from .training.state import EpochMeter, FiniteGuard, TrainingDiverged, TrainState, restore_rng
from .utils import seed_everything

__all__ = ["train", "TrainingDiverged", "TrainState", "FiniteGuard", "EpochStats", "train_one_epoch",
           "evaluate_epoch", "lr_at", "build_optimizer", "build_train_sampler", "load_split", "make_transforms",
           "accuracy", "held_out_key", "fewshot_validation", "preserved_rng", "rank_seed", "check_protocol",
           "check_method", "resolve_run_dir", "write_metrics_csv", "save_checkpoint", "_fewshot_method_kwargs"]


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and return the final metrics record (also the run directory under ``'run_dir'``).

    A resume ignores ``cfg``: it continues ``run_dir/last.pt`` with the config stored there, after
    checking it against ``config.yaml`` / ``best.pt``; ``overrides`` may change only the keys of
    ``rundir.RESUME_SAFE_KEYS`` (``train.epochs=N`` extends a finished run). Without resume,
    ``overrides`` are applied to ``cfg``. Everything (config, registry names, data, protocols) is
    checked before the run directory is created or touched, and the directory is locked while
    training. ``train.max_steps=N`` ends this launch after N global steps as if it were interrupted
    there (the record is then ``{'stopped_at_step': N, 'run_dir': ...}``; a resume continues from
    the last checkpoint and drops the cap unless given again). Under ``torchrun`` every process
    calls this; only rank 0 logs and writes files, and all return the same record.
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
        return _train(cfg, lock, ckpt, changed, ctx, overwrite=overwrite, log=log, tb=tb)
    finally:
        tb.close()
        lock.release()
        shutdown(ctx)


def _train(cfg: Config, lock: RunDirLock, ckpt: dict[str, Any] | None, changed: list[str], ctx: DistContext, *,
           overwrite: bool, log: Callable[[str], None], tb: TensorBoardLog) -> dict[str, Any]:
    """The driver: check, build, restore, claim the run directory, run the epochs, finish."""
    t, device, world, main = cfg.train, ctx.device, ctx.world_size, ctx.is_main
    say = log if main else (lambda _msg: None)
    check_train_config(t, world)
    run_dir = lock.path
    rank0_decides(lambda: _claim_early(lock, ckpt is not None, overwrite))
    seed_everything(t.seed)  # same on every rank: identical data views and model initialisation

    # -- data (rank 0 first: a download or cache build happens once); nothing is written before the
    #    data, the model and the protocols are known to work, so a failed start leaves no folder
    train_set, test_set, val_set = rank0_first(lambda: load_sets(cfg))
    _check_data(cfg, ckpt, run_dir, train_set, val_set)
    train_tf, test_tf, data_meta = make_transforms(cfg, train_set)
    say(f"data: {cfg.data.name} {cfg.data.train_split}: {len(train_set)} images, {train_set.num_classes} classes"
        + (f"; {cfg.data.test_split}: {len(test_set)}" if test_set is not None else "")
        + (f"; {cfg.data.val_split}: {len(val_set)} ({val_set.num_classes} classes)" if val_set is not None else ""))

    # -- model, optimiser, sampler, AMP; the state a checkpoint holds (restored on resume: every rank
    #    loads the same checkpoint, and weights that do not fit fail before the folder is touched)
    model = _build_model(cfg, train_set, ctx)
    optimizer = build_optimizer(cfg, model)
    sampler = build_train_sampler(cfg, train_set.labels, world, ctx.rank)
    steps_per_epoch = steps_per_epoch_of(t, sampler, len(train_set))
    amp_dtype, use_amp, scaler = amp_settings(t, device, say)
    say(f"model: {cfg.model.backbone} ({model.backbone.out_dim}-d) + {cfg.head.name} head "
        f"(margin {cfg.head.margin}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{steps_per_epoch} steps/epoch on {device}"
        + (f" x {world} processes ({t.batch_size // world} images each per step{', SyncBN' if t.sync_bn else ''})"
           if world > 1 else ""))
    state = TrainState(model, optimizer, scaler, EpochMeter(device), FiniteGuard(run_dir),
                       {"config": to_dict(cfg), "class_names": list(train_set.class_names), "data": data_meta},
                       world=world, main=main)
    if ckpt is not None:
        state.restore(ckpt, run_dir / "last.pt")

    # -- all checks passed: only now the run directory is created (or emptied) and locked
    rank0_decides(lambda: _claim(lock, cfg, ckpt, changed, overwrite, say))
    if ckpt is not None:
        if main:
            truncate_jsonl(run_dir / "metrics.jsonl",
                           [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["epoch"] <= state.epoch])
        say(f"resumed {run_dir} at epoch {state.epoch}, step {state.step}")
    if main:
        tb.open(run_dir, state.step, resumed=ckpt is not None)
    forward = _wrap_for_training(model, ctx, t.compile)
    restore_rng(ckpt, ctx.rank, world, t.seed, state.step)

    # -- the epochs: train, evaluate (without disturbing the training RNG), log, checkpoint
    loop = EpochLoop(cfg, forward, train_set, train_tf, sampler, t.batch_size // world, steps_per_epoch, device,
                     amp_dtype, use_amp, tb, run_dir, main)
    evaluation = Evaluation(cfg, test_tf, device, test_set, val_set)
    if t.max_steps is not None and state.step >= t.max_steps:
        return {"stopped_at_step": state.step, "run_dir": str(run_dir)}
    last: dict[str, Any] = {}
    forward.train()
    while state.epoch < t.epochs:
        stats = train_one_epoch(state, loop)
        if stats.stopped:
            return {"stopped_at_step": state.step, "run_dir": str(run_dir)}
        record = evaluate_epoch(state, evaluation, stats.record())
        state.meter.reset()
        if main:
            append_jsonl(run_dir / "metrics.jsonl", record)
            write_metrics_csv(run_dir, read_jsonl(run_dir / "metrics.jsonl"))
            tb.epoch(record)
        state.save([run_dir / "best.pt", run_dir / "last.pt"] if record["best"] else [run_dir / "last.pt"],
                   before_write=tb.flush)
        say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        last = record
    _finish(run_dir, t.epochs, bool(last), main, say)
    return {**last, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------- steps of the driver

def _check_data(cfg: Config, ckpt: dict[str, Any] | None, run_dir: Path, train_set: ImageDataset,
                val_set: ImageDataset | None) -> None:
    """The splits fit the run: a resume's classes, the validation and test episode protocols and methods."""
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


def _build_model(cfg: Config, train_set: ImageDataset, ctx: DistContext) -> Classifier:
    """The classifier on the device: SyncBN across processes when asked, channels_last when asked."""
    t = cfg.train
    model = build_model(cfg, train_set.num_classes, train_set.channels, train_set.image_size).to(ctx.device)
    if ctx.world_size > 1 and t.sync_bn:
        model = convert_sync_batchnorm(model, ctx.device)  # type: ignore[assignment]
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _wrap_for_training(model: Classifier, ctx: DistContext, compile_: bool) -> nn.Module:
    """The module the step loop calls: DDP across processes, then ``torch.compile`` when asked."""
    forward: nn.Module = model
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        device = ctx.device
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True)
    if compile_:
        forward = torch.compile(forward)  # type: ignore[assignment]
    return forward


def _finish(run_dir: Path, epochs: int, trained: bool, main: bool, say: Callable[[str], None]) -> None:
    """Say when there was nothing to do; make sure best.pt exists (no epoch had the monitored metric)."""
    if not trained and main:
        say(f"{run_dir} is finished (epoch {epochs} of {epochs}); nothing to do (train longer with "
            f"`lowshot train --resume {run_dir} train.epochs=N`)")
    if main and not (run_dir / "best.pt").exists():
        data = (run_dir / "last.pt").read_bytes()
        atomic_write(run_dir / "best.pt", lambda f: f.write(data))


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
