"""Run directories: one training at a time, failed starts retried, resumes that trust nothing.

- ``RunDirLock``: an exclusive ``flock`` on the run directory itself, held by the process that
  trains into it (rank 0 under torchrun) until it exits. The kernel drops the lock when the owner
  dies, so a lock never goes stale; ``.lock`` only names the owner's pid for the error message.
- ``inspect_new_run_dir``: whether a new run may use a folder (empty, or a failed start: nothing
  but what a run writes before its first checkpoint), else the one-line refusal.
- ``open_resume``: the checkpoint of a run to continue, checked against the run's ``config.yaml``
  and ``best.pt``, plus the few overrides a resume accepts (``RESUME_SAFE_KEYS``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from .checkpoint import load_checkpoint
from .config import Config, config_from_checkpoint, from_dict, parse_override, set_dotted, to_dict
from .errors import CheckpointError, ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
BEFORE_FIRST_CHECKPOINT = frozenset({"config.yaml", "metrics.jsonl", "metrics.csv", "tensorboard"})
# keys that change neither the model nor the steps already taken: a finished run can be extended
# (train.epochs) and progress / checkpoint cadence changed on resume; everything else is refused
RESUME_SAFE_KEYS = ("train.epochs", "train.progress", "train.checkpoint_every", "train.nan_check_every",
                    "train.max_steps")
# keys of one launch (train.max_steps: stop after N steps as if interrupted): a resume resets them to
# their defaults unless given again, so a capped run continues to its end
LAUNCH_KEYS = ("train.max_steps",)


# ----------------------------------------------------------------------------- the lock

class RunDirLock:
    """Exclusive lock on a run directory (``flock`` of the directory, pid in ``DIR/.lock``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise ConfigError at once naming the owner (never waits)."""
        if self._fd is not None or fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"run directory {self.path} is in use by another lowshot process{self._owner()}; "
                              f"wait for it to finish or choose another --run-dir") from None
        self._fd = fd
        try:
            (self.path / LOCK_NAME).write_text(f"{os.getpid()}\n")
        except OSError:
            pass  # the pid is only for messages
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _owner(self) -> str:
        try:
            pid = int((self.path / LOCK_NAME).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return ""
        return f" (pid {pid})"

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def is_temp_leftover(name: str) -> bool:
    """A temp file of the atomic writer (``.NAME.xxxx.tmp``) that a killed process left behind."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_leftovers(path: Path) -> None:
    """Call only while holding the lock: no other writer can be inside a write then."""
    for p in path.iterdir():
        if is_temp_leftover(p.name) and p.is_file():
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- new runs

def inspect_new_run_dir(path: Path, overwrite: bool) -> str:
    """``'absent'``, ``'empty'``, ``'overwrite'`` or ``'failed start'``; raises ConfigError otherwise.

    A failed start (no ``last.pt`` to resume, only files a run writes before it) holds nothing worth
    keeping, so the same command simply runs again.
    """
    if not path.exists():
        return "absent"
    if not path.is_dir():
        raise ConfigError(f"run directory {path} exists and is not a directory")
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME and not is_temp_leftover(p.name))
    if not names:
        return "empty"
    if overwrite:
        return "overwrite"
    if not files_beyond_failed_start(path):
        return "failed start"  # (a best.pt without last.pt: killed between the two writes of epoch 1)
    raise ConfigError(f"run directory {path} is not empty: resume it with --resume {path}, "
                      f"choose another name=..., or pass --overwrite")


def files_beyond_failed_start(path: Path) -> list[str]:
    """Names in ``path`` that a run does not write before its first ``last.pt`` (empty: a failed start)."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME and not is_temp_leftover(p.name)
                  and p.name not in BEFORE_FIRST_CHECKPOINT | {"best.pt"})


def clear_run_dir(path: Path) -> None:
    """Empty ``path`` but keep the directory itself (its inode carries the lock)."""
    import shutil
    for p in path.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ----------------------------------------------------------------------------- resume

def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two config dicts (both completed with today's defaults)."""
    fa, fb = flat(to_dict(from_dict(a))), flat(to_dict(from_dict(b)))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _describe(diffs: list[tuple[str, Any, Any]], left: str, right: str) -> str:
    shown = "; ".join(f"{k}: {left} {va!r}, {right} {vb!r}" for k, va, vb in diffs[:3])
    return shown + (f" (and {len(diffs) - 3} more keys)" if len(diffs) > 3 else "")


def check_resume_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` overrides of a resume; any key outside RESUME_SAFE_KEYS is refused."""
    out = []
    for item in overrides:
        key, value = parse_override(item)
        set_dotted({}, key, value)  # unknown keys get the usual "did you mean" message
        if key not in RESUME_SAFE_KEYS:
            raise ConfigError(f"--resume continues a run with the config stored in its checkpoint; {key!r} cannot "
                              f"change on resume (only {', '.join(RESUME_SAFE_KEYS)} can); "
                              f"start a new run to change it")
        out.append((key, value))
    return out


def open_resume(run_dir: str | Path,
                overrides: Iterable[str] = ()) -> tuple[Path, dict[str, Any], Config, list[str]]:
    """Read and check what a resume continues: ``(run_dir, checkpoint, config, changed keys)``.

    Read-only (every process of a torchrun launch does it). Refuses, naming the keys and values:
    a ``config.yaml`` that disagrees with ``last.pt`` (hand-edited, or a ``last.pt`` copied from another
    run), a ``best.pt`` of another model, a checkpoint that is not a training checkpoint, and
    overrides outside ``RESUME_SAFE_KEYS`` or ``train.epochs`` below the epochs already done.
    """
    path = Path(run_dir)
    wanted = check_resume_overrides(overrides)
    last = path / "last.pt"
    if not last.is_file():
        hint = (" (the run stopped before its first checkpoint: run the same `lowshot train` command again)"
                if path.is_dir() and (path / "config.yaml").is_file() else "")
        raise ConfigError(f"cannot resume: {last} does not exist{hint}")
    ckpt = load_checkpoint(last)
    if ckpt.get("kind", "train") != "train" or "config" not in ckpt:
        raise CheckpointError(f"cannot resume: {last} is not a training checkpoint (kind {ckpt.get('kind')!r})")
    for key in ("epoch", "step", "epoch_step", "model", "head", "optimizer", "class_names"):
        if key not in ckpt:
            raise CheckpointError(f"cannot resume: {last} lacks the {key!r} entry")
    try:
        stored = config_from_checkpoint(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"cannot resume: the config stored in {last} is invalid: {e}") from None
    stored_dict = to_dict(stored)
    overridden = {k for k, _ in wanted}

    on_disk = path / "config.yaml"
    if on_disk.is_file():
        try:
            text = yaml.safe_load(on_disk.read_text()) or {}
            diffs = config_differences(text, stored_dict)
        except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"cannot resume: {on_disk} is not a valid run config ({e}); it must match the config "
                              f"stored in {last}") from None
        hard = [d for d in diffs if d[0] not in RESUME_SAFE_KEYS]
        if hard:
            raise ConfigError(f"cannot resume {path}: config.yaml and last.pt describe different runs "
                              f"({_describe(hard, 'config.yaml', 'last.pt')}); a resume continues last.pt with its own "
                              f"config: restore config.yaml, or start a new run")
        soft = [d for d in diffs if d[0] not in overridden and d[0] not in LAUNCH_KEYS]
        if soft:
            k, va, vb = soft[0]
            raise ConfigError(f"cannot resume {path}: config.yaml has {k}={va!r} but last.pt {vb!r}; pass {k}=... "
                              f"on the command line to choose (e.g. {k}={va})")
    best = path / "best.pt"
    if best.is_file():
        other = load_checkpoint(best).get("config")
        diffs = [d for d in config_differences(other or {}, stored_dict) if d[0] not in RESUME_SAFE_KEYS]
        if diffs or other is None:
            raise CheckpointError(f"cannot resume {path}: best.pt belongs to another run "
                                  f"({_describe(diffs, 'best.pt', 'last.pt') if diffs else 'no config'}); "
                                  f"move it away or start a new run")

    changed = []
    data = to_dict(stored)
    defaults = flat(to_dict(Config()))
    for key in LAUNCH_KEYS:
        set_dotted(data, key, defaults[key])
    for key, value in wanted:
        set_dotted(data, key, value)
    cfg = config_from_checkpoint(data)
    for key, old, new in config_differences(stored_dict, to_dict(cfg)):
        changed.append(f"{key}: {old!r} -> {new!r}")
    epoch, epoch_step = int(ckpt["epoch"]), int(ckpt["epoch_step"])
    least = max(1, epoch + (1 if epoch_step else 0))
    if cfg.train.epochs < least:
        trained = f"{epoch} epochs" + (f" and {epoch_step} steps of epoch {epoch + 1}" if epoch_step else "")
        raise ConfigError(f"config key 'train.epochs': {path} has already trained {trained}; "
                          f"train.epochs={cfg.train.epochs} is too few (give at least {least})")
    return path, ckpt, cfg, changed
