"""Embedding export with a checkpoint's own test-time preprocessing."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .fileio import atomic_write
from .data.io import list_images, load_image
from .errors import DataError
from .inference import FrozenRun
from .utils import progress


@torch.no_grad()
def embed_images(checkpoint: str | Path, paths: Sequence[str | Path], *, batch_size: int = 256,
                 device: str = "auto", show_progress: bool = True) -> dict[str, Any]:
    """Features of image files / directories (recursive), in sorted path order."""
    run = FrozenRun.open(checkpoint, device=device)
    meta, dev = run.metadata, run.device
    files = list_images([str(p) for p in paths])
    if not files:
        raise DataError(f"no images (png/jpg/jpeg/bmp/webp) found under {', '.join(map(str, paths))}")
    feats = []
    for i in progress(range(0, len(files), batch_size), total=-(-len(files) // batch_size), desc="embed",
                      enabled=show_progress):
        invert = bool(meta.get("preprocess", {}).get("invert", False))
        batch = torch.stack([load_image(f, meta["image_size"], meta["channels"], invert=invert)
                             for f in files[i:i + batch_size]])
        feats.append(run.model.backbone(run.transform(batch.to(dev))).float().cpu())
    return {"features": torch.cat(feats).numpy().astype(np.float32), "paths": np.array([str(f) for f in files]),
            "head": np.array(run.head_name)}


def embed_dataset_split(checkpoint: str | Path, split: str, *, dataset: str | None = None, root: str | None = None,
                        batch_size: int = 256, device: str = "auto", show_progress: bool = True) -> dict[str, Any]:
    """Features + labels + class names of a dataset split (default: the checkpoint's dataset).

    Also ``group_<KEY>``: the per-sample group id of every class-metadata key of the dataset (e.g.
    ``group_alphabet`` for Omniglot, for ``lowshot eval --features FILE --within alphabet``), and
    ``head``: the training head's name (its family sets the fine-tune head of ``eval --features``).
    A reader that takes ``channels`` (e.g. ``image_folder``) is asked for the checkpoint's.
    """
    run = FrozenRun.open(checkpoint, device=device, dataset_name=dataset, root=root, batch_size=batch_size,
                         show_progress=show_progress, cache=False)
    feats, labels = run.features(split)
    ds = run.dataset(split)
    out = {"features": feats.numpy().astype(np.float32), "labels": labels.numpy(),
           "class_names": np.array(ds.class_names), "head": np.array(run.head_name)}
    for key in sorted(ds.class_meta):
        groups = np.asarray(ds.sample_groups(key))
        if groups.dtype.kind == "O":   # mixed / None values: strings, so the .npz needs no pickle
            groups = np.asarray([str(g) for g in ds.sample_groups(key)])
        out[f"group_{key}"] = groups
    return out


def save_npz(path: str | Path, arrays: dict[str, Any]) -> Path:
    """Atomic .npz write (no pickled objects: strings are stored as fixed-width unicode)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(Path(path), lambda f: f.write(buf.getvalue()))
