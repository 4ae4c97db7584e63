"""On-disk cache of frozen-backbone features, shared by every stage-2 method of a run.

Stage 2 never changes the backbone (except cRT on images with ``freeze_bn=false``), so cRT,
tau-norm, LWS and NCM all read the same train / val / test features: extracting them once and
reusing them makes the second method almost free. Entries live in ``<run_dir>/features/`` and
are keyed by a SHA-256 over what determines the features: the backbone's architecture and
weights (tensor bytes, not the checkpoint file, so a decoupled checkpoint that kept the
backbone hits the same entries), the test-time normalisation and the dataset split (name,
options, root). A changed checkpoint therefore never reads stale features. Writes are atomic;
an unreadable or mismatching entry is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write

CACHE_VERSION = 1


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_key(backbone_state: dict[str, torch.Tensor], description: dict[str, Any]) -> str:
    """Cache key of one split's features: backbone weights + a JSON-able description."""
    desc = json.dumps({"version": CACHE_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256((state_digest(backbone_state) + desc).encode()).hexdigest()


def cache_path(directory: str | Path, split: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in split)
    return Path(directory) / f"{safe}-{key[:20]}.pt"


def load_cached(path: Path, key: str, expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached (features, labels) when the entry exists, loads safely, matches ``key`` and its labels
    equal ``expected`` (the dataset's labels: a changed dataset on disk is a miss, too)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("key") != key:
            return None
        feats, labels = obj["features"], obj["labels"]
        ok = feats.dim() == 2 and labels.dim() == 1 and feats.shape[0] == labels.shape[0]
        if not ok or (expected is not None and not torch.equal(labels, expected.reshape(-1).long())):
            return None
        return feats, labels
    except Exception as err:  # noqa: BLE001  (a torn / foreign file is a cache miss, not a failure
        warnings.warn(f"ignoring unreadable feature cache {path}: {err}", stacklevel=2)
        return None


def store(path: Path, key: str, split: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    obj = {"key": key, "split": split, "features": features.contiguous(), "labels": labels.contiguous(),
           "version": CACHE_VERSION}
    atomic_write(path, lambda f: torch.save(obj, f))


def cached_features(directory: str | Path | None, split: str, key: str, expected: torch.Tensor | None,
                    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(features, labels, hit)``: read the entry or compute and store it (``directory=None``: no cache)."""
    if directory is None:
        feats, labels = compute()
        return feats, labels, False
    path = cache_path(directory, split, key)
    hit = load_cached(path, key, expected)
    if hit is not None:
        return hit[0], hit[1], True
    feats, labels = compute()
    store(path, key, split, feats, labels)
    return feats, labels, False
