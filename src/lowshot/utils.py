"""Small shared helpers: seeding, devices, optional imports, progress bars (files: ``fileio``)."""
from __future__ import annotations

import importlib
import random
import sys
import time
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
