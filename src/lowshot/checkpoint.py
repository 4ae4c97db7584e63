"""Atomic checkpoint writes and safe (weights-only) loads.

A checkpoint is a plain-data dict (tensors, numbers, strings, lists, dicts): ``torch.load`` with
``weights_only=True`` can read it, and a file carrying pickled code is refused before anything runs.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .fileio import atomic_write

CHECKPOINT_VERSION = 1


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a plain-data checkpoint dict."""
    obj = dict(obj)
    obj.setdefault("version", CHECKPOINT_VERSION)
    return atomic_write(path, lambda f: torch.save(obj, f))


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``best.pt`` (else ``last.pt``); clear error if none."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; anything that is not plain data is refused, unexecuted."""
    path = resolve_checkpoint_path(path)
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint (not a file written by torch.save; "
                              f"lowshot checkpoints are the best.pt / last.pt of a run directory)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data, which could run "
            f"code on load ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, legacy, a pickle: first byte 0x80); anything else is not one."""
    import zipfile
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    return head[:1] == b"\x80" or zipfile.is_zipfile(path)


def export_safetensors(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Export model + head weights (``model.*``, ``head.*``) to a safetensors file."""
    from .utils import require
    save_file = require("safetensors.torch", "lowshot export").save_file
    tensors = {}
    for part in ("model", "head"):
        for k, v in (ckpt.get(part) or {}).items():
            tensors[f"{part}.{k}"] = v.detach().contiguous().cpu()
    path = Path(path)
    meta = {"format": "lowshot", "num_classes": str(len(ckpt.get("class_names", [])))}
    if path.is_dir():
        raise CheckpointError(f"--out {path} is a directory; give the output file, e.g. {path / 'model.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)  # a missing output folder is created, as for every writer
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
