"""Small shared helpers: seeding, devices, optional imports, JSONL logs, progress bars."""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

import torch

# import name -> (pip package, pyproject extra)
OPTIONAL = {"safetensors": ("safetensors", "safetensors"), "sklearn": ("scikit-learn", "test"),
            "matplotlib": ("matplotlib", None)}


def require(module: str, purpose: str) -> ModuleType:
    """Import a dependency lowshot cannot work without for ``purpose``, else one clear error.

    Called at the start of a command (before any training or loading), so a missing package is a
    one-line ``ConfigError`` (the set-up is wrong, not the data) naming what to install, never a
    traceback after minutes of work.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        from .errors import ConfigError
        top = module.split(".")[0]
        pkg, extra = OPTIONAL.get(top, (top, None))
        how = f"pip install {pkg}" + (f" (or the [{extra}] extra of lowshot)" if extra else "")
        raise ConfigError(f"{purpose} needs the Python package {pkg!r}, which does not import "
                           f"({type(e).__name__}: {e}); install it with `{how}`") from None


def seed_everything(seed: int) -> None:
    """Seed python and torch (numpy's global RNG is never used by lowshot)."""
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use device=cpu or auto)")
    return dev


def rng_state() -> dict[str, Any]:
    """RNG states as plain data (weights_only-loadable)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_list()}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _py_state_to_list() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


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
    from .checkpoint import write_text_atomic
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


def progress(iterable: Iterable[Any], *, total: int | None = None, desc: str = "", enabled: bool = True,
             leave: bool = False, delay: float = 2.0, interval: float = 10.0) -> Iterator[Any]:
    """Progress of a loop on stderr, shown only once it has run ``delay`` seconds.

    On a terminal: a tqdm bar. Elsewhere (CI, nohup, SLURM logs) bars would write a carriage-return
    flood, so a plain line is printed at most every ``interval`` seconds, plus one at the end if any
    was printed. Plain iteration when disabled.
    """
    if not enabled:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if _isatty(sys.stderr):
        from tqdm.auto import tqdm
        yield from tqdm(iterable, total=total, desc=desc, leave=leave, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5, delay=delay)
        return
    yield from plain_progress(iterable, total=total, desc=desc, interval=interval)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def plain_progress(iterable: Iterable[Any], *, total: int | None = None, desc: str = "", interval: float = 10.0,
                   stream: Any = None, clock: Any = time.monotonic) -> Iterator[Any]:
    """``progress`` for logs: ``desc: 120/480 (25%) 10s elapsed, ~30s left`` at most every ``interval`` s."""
    out = stream if stream is not None else sys.stderr
    name = desc or "progress"
    start = last = clock()
    n, printed = 0, False
    for item in iterable:
        yield item
        n += 1
        now = clock()
        if now - last >= interval:
            done = f"{n}/{total} ({100 * n / total:.0f}%)" if total else f"{n}"
            left = f", ~{(now - start) * (total - n) / n:.0f}s left" if total and n < total else ""
            out.write(f"{name}: {done} {now - start:.0f}s elapsed{left}\n")
            out.flush()
            last, printed = now, True
    if printed:
        out.write(f"{name}: done, {n} in {clock() - start:.0f}s\n")
        out.flush()
