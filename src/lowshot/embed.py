"""Embedding export with a checkpoint's own test-time preprocessing."""
from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write, load_checkpoint
from .config import Config
from .data.base import ImageDataset
from .errors import DataError
from .features import extract_features
from .models import Classifier, model_from_checkpoint
from .utils import progress, resolve_device


def load_for_inference(checkpoint: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[Classifier, Config, Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Model in eval mode, its config, its test transform and the checkpoint dict."""
    from .data.transforms import build_transform
    ckpt = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ckpt)
    meta = ckpt["data"]
    transform = build_transform(False, meta["image_size"], meta["channels"], meta["mean"], meta["std"])
    return model.to(resolve_device(str(device))).eval(), cfg, transform, ckpt


@torch.no_grad()
def embed_images(checkpoint: str | Path, paths: Sequence[str | Path], *, batch_size: int = 256,
                 device: str = "auto", show_progress: bool = True) -> dict[str, Any]:
    """Features of image files / directories (recursive), in sorted path order."""
    from .data.io import list_images, load_image
    dev = resolve_device(device)
    model, _, transform, ckpt = load_for_inference(checkpoint, dev)
    meta = ckpt["data"]
    files = list_images([str(p) for p in paths])
    if not files:
        raise DataError(f"no images (png/jpg/jpeg/bmp/webp) found under {', '.join(map(str, paths))}")
    feats = []
    for i in progress(range(0, len(files), batch_size), total=-(-len(files) // batch_size), desc="embed",
                      enabled=show_progress):
        invert = bool(meta.get("preprocess", {}).get("invert", False))
        batch = torch.stack([load_image(f, meta["image_size"], meta["channels"], invert=invert)
                             for f in files[i:i + batch_size]])
        feats.append(model.backbone(transform(batch.to(dev))).float().cpu())
    return {"features": torch.cat(feats).numpy().astype(np.float32), "paths": np.array([str(f) for f in files]),
            "head": np.array(ckpt["config"]["head"]["name"])}


def embed_dataset_split(checkpoint: str | Path, split: str, *, dataset: str | None = None, root: str | None = None,
                        batch_size: int = 256, device: str = "auto", show_progress: bool = True) -> dict[str, Any]:
    """Features + labels + class names of a dataset split (default: the checkpoint's dataset).

    Also ``group_<KEY>``: the per-sample group id of every class-metadata key of the dataset (e.g.
    ``group_alphabet`` for Omniglot, for ``lowshot eval --features FILE --within alphabet``), and
    ``head``: the training head's name (its family sets the fine-tune head of ``eval --features``).
    A reader that takes ``channels`` (e.g. ``image_folder``) is asked for the checkpoint's.
    """
    from .data.registry import DATASETS
    dev = resolve_device(device)
    model, cfg, transform, ckpt = load_for_inference(checkpoint, dev)
    meta = ckpt["data"]
    name = dataset or cfg.data.name
    options = dict(cfg.data.options) if dataset is None else {}
    if dataset is not None and "channels" in inspect.signature(DATASETS.get(name)).parameters:
        options["channels"] = meta["channels"]
    from .features import build_checkpoint_dataset
    ds: ImageDataset = build_checkpoint_dataset(cfg.data.root, name, split, root=root, dataset=dataset,
                                                image_size=meta["image_size"], **options)
    if ds.channels != meta["channels"]:
        raise DataError(f"dataset {name!r} has {ds.channels}-channel images but the checkpoint expects "
                        f"{meta['channels']}")
    feats, labels = extract_features(model.backbone, ds, transform, batch_size, dev, show_progress=show_progress)
    out = {"features": feats.numpy().astype(np.float32), "labels": labels.numpy(),
           "class_names": np.array(ds.class_names), "head": np.array(cfg.head.name)}
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
