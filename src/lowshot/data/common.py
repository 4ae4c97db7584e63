"""Helpers shared by the file-based benchmark readers (CIFAR, mini/tiered-ImageNet, CUB, LT lists).

The data-root lookup (explicit root, else ``$LOWSHOT_DATA/<name>``; never a hard-coded folder), the
restricted unpickler (benchmark pickles come from third-party mirrors: a plain ``pickle.load`` would
run whatever code a file names), batched uint8 resizing, checked download + safe extraction, and the
seeded per-class hold-out behind the ``base_test`` split.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .base import ImageDataset
from .splits import holdout_per_class

from .info import ENV_VAR  # noqa: E402  (one definition, in info.py)
FEW_SHOT_SPLITS = ("base", "val", "novel", "base_train", "base_test")

# ---------------------------------------------------------------------------------------------
# Shared helpers (used by minimagenet.py, tiered.py and cub.py too)
# ---------------------------------------------------------------------------------------------


def dataset_root(name: str, root: str | os.PathLike[str] | None) -> Path:
    """``root`` if given, else ``$LOWSHOT_DATA/<name>``; no hard-coded fallback location."""
    if root is not None:
        return Path(root).expanduser()
    base = os.environ.get(ENV_VAR)
    if not base:
        raise DataError(f"no data root for dataset {name!r}: pass root=... or set ${ENV_VAR} "
                        f"(the data is then read from ${ENV_VAR}/{name})")
    return Path(base).expanduser() / name


def check_split(dataset: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ConfigError(f"unknown split {split!r} for dataset {dataset!r} (choose from {', '.join(allowed)})")


def split_base(base: ImageDataset, split: str, holdout: float = 0.1, holdout_seed: int = 0) -> ImageDataset:
    """The ``base_train`` / ``base_test`` part of ``base``; any other split returns it unchanged.

    ``base_test`` is a seeded hold-out of the base images (``holdout``: a fraction, default 10% per
    class, or a count per class), used to measure base-class accuracy on images the backbone never
    trained on; ``base_train`` is the complement. Both must be built with the same
    ``holdout``/``holdout_seed`` to be disjoint. ``base`` itself is every base image (the published
    protocols train on all of them).
    """
    if split not in ("base_train", "base_test"):
        return base
    ok = not isinstance(holdout, bool) and ((isinstance(holdout, float) and 0.0 < holdout < 1.0)
                                            or (isinstance(holdout, int) and holdout >= 1))
    if not ok:
        raise ConfigError(f"holdout must be a fraction in (0, 1) or a count >= 1, got {holdout!r}")
    keep, held = holdout_per_class(base.labels, holdout, holdout_seed)
    return base.subset(keep if split == "base_train" else held)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 [N,C,H,W] in chunks (bounded float memory)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        x = images[s:s + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays/scalars and plain builtin containers.

    Pickle is a program, not a data format: ``find_class`` is how it obtains callables, so refusing
    every global except array reconstruction makes a hostile file fail instead of running code.
    """

    _NUMPY = frozenset({"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"})
    _NUMPY_MODULES = frozenset({"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                                "numpy._core.numeric"})
    _BUILTINS = frozenset({"set", "frozenset", "bytearray", "bytes", "complex", "slice", "list", "dict", "tuple",
                           "int", "float", "str", "bool"})

    def find_class(self, module: str, name: str) -> Any:
        if module in self._NUMPY_MODULES and name in self._NUMPY:
            if module.startswith("numpy.core."):  # numpy >= 2 moved these (old pickles name the old path)
                modern = "numpy._core." + module.split(".")[-1]
                try:
                    return super().find_class(modern, name)
                except (ImportError, AttributeError):
                    pass
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return super().find_class("builtins", name)
        if (module, name) in (("_codecs", "encode"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def safe_pickle_load(path: str | os.PathLike[str]) -> Any:
    """Load a (possibly Python 2) data pickle allowing only numpy arrays and builtin containers.

    Python 2 ``str`` objects come back as latin-1 ``str`` (numpy's own recommendation for old array
    pickles); callers turn them back into bytes where they hold binary data.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"unsafe or corrupt pickle {path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"corrupt pickle {path}: {type(e).__name__}: {e}") from None


def fetch(url: str, md5: str, root: Path, folder: str) -> Path:
    """Download ``url`` into ``root`` (checked against ``md5``) and extract its top-level ``folder``
    to ``root/folder``: all-or-nothing, via a scratch directory (the archive sits in ``root``)."""
    from .archives import download_url, safe_extract  # lazy: only needed for download=True

    root.mkdir(parents=True, exist_ok=True)
    archive = download_url(url, root / url.rsplit("/", 1)[1].split("?")[0], md5=md5)
    scratch = root / f".{folder}.unpack"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        safe_extract(archive, scratch)
        if not (scratch / folder).is_dir():
            raise DataError(f"{archive} has no top-level folder {folder!r}")
        os.replace(scratch / folder, root / folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root / folder


