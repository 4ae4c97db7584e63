"""Files that survive crashes: atomic writes with the umask's mode, and append-only JSONL logs.

The lowest layer (nothing in lowshot but ``errors`` below it), so checkpoints, run directories,
datasets and reports all write through the same primitives.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-get)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions ``open()`` / ``mkdir()`` would give: 0o666 / 0o777 minus the umask.

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 whatever the umask; files renamed into
    place from them get this mode instead, so colleagues can read shared runs when the umask says so.
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync: a crash can at worst tear the last line."""
    line = json.dumps(_jsonable(record), sort_keys=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file, ignoring a torn (unparsable) last line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line from a crash
            raise
    return out


def truncate_jsonl(path: str | Path, keep: Iterable[dict[str, Any]]) -> None:
    """Rewrite a JSONL file atomically with only ``keep`` (used when resuming)."""
    write_text_atomic(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in keep))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a truncated file (a
    ``.NAME.*.tmp`` file may stay behind; a run directory's lock owner removes those). The file
    gets the umask's usual mode, not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            _test_pause(path)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


PAUSE_ENV = "LOWSHOT_TEST_WRITE_PAUSE"
_writes_seen: dict[str, int] = {}


def _test_pause(path: Path) -> None:
    """Test hook: ``LOWSHOT_TEST_WRITE_PAUSE=last.pt:30:4`` lets 4 writes of files named ``last.pt``
    through, then sleeps 30 s inside each later one (data written, not yet fsynced nor renamed), so a
    test can kill the process in the middle of a checkpoint write. Unset: no effect."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, seconds, skip = (spec.split(":") + ["0"])[:3]
    if name == path.name:
        _writes_seen[name] = _writes_seen.get(name, 0) + 1
        if _writes_seen[name] > int(skip):
            time.sleep(float(seconds))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


