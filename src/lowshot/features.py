"""Frozen-feature extraction shared by eval, decouple, analyze and embed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data.base import ImageDataset
from .data.loader import BatchLoader
from .utils import progress


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: ImageDataset, transform: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 256, device: str | torch.device = "cpu", *, show_progress: bool = True,
                     desc: str = "features", channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 (CPU) and labels [N] for every sample, in dataset order.

    ``show_progress``: a bar (or, in a log, a line every ~10 s) once extraction has run 2 s.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    loader = BatchLoader(dataset, batch_size, pin_memory=device.type == "cuda")
    try:
        for x, y in progress(loader, total=len(loader), desc=desc, enabled=show_progress):
            x = transform(x.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(backbone(x).float().cpu())
            labels.append(y)
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.zeros(0, getattr(backbone, "out_dim", 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def build_checkpoint_dataset(cfg_root: str | None, name: str, split: str, *, root: str | None,
                             dataset: str | None, **kwargs: object) -> ImageDataset:
    """The dataset a checkpoint was trained on (or ``dataset``); a data error says ``--root`` overrides the root."""
    from .data import build_dataset
    from .errors import DataError
    data_root = root if root is not None else (cfg_root if dataset is None else None)
    try:
        return build_dataset(name, split, root=data_root, **kwargs)
    except DataError as e:
        if root is not None or dataset is not None:
            raise
        where = f"data.root {cfg_root!r}" if cfg_root else "the default data location (data.root unset)"
        raise DataError(f"{e} [{where} comes from the checkpoint's config; pass --root DIR to override it]") from None


def cached_split_features(checkpoint: str | Path, split: str, *, dataset: str | None = None,
                          root: str | None = None, batch_size: int = 256, device: str = "auto",
                          show_progress: bool = True, cache: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features, labels and class names of a dataset split under a checkpoint, cached on disk.

    Entries live in ``<checkpoint dir>/features/`` (see ``feature_cache``: keyed by the backbone's
    weights, the test-time normalisation and the dataset/split), shared with ``lowshot decouple``.
    """
    feats, labels, names, _ = split_features(checkpoint, split, dataset=dataset, root=root, batch_size=batch_size,
                                             device=device, show_progress=show_progress, cache=cache)
    return feats, labels, names


def split_features(checkpoint: str | Path, split: str, *, within: str | None = None, dataset: str | None = None,
                   root: str | None = None, batch_size: int = 256, device: str = "auto",
                   show_progress: bool = True, cache: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Any] | None]:
    """``cached_split_features`` plus the group id of every sample from ``class_meta[within]``.

    The groups (None without ``within``) feed within-group episodes (``evaluate(..., groups=)``);
    an unknown key fails before any feature is extracted, naming the keys the dataset has.
    """
    from . import feature_cache
    from .embed import load_for_inference
    from .errors import DataError
    from .utils import resolve_device
    from .checkpoint import resolve_checkpoint_path
    checkpoint = resolve_checkpoint_path(checkpoint)
    dev = resolve_device(device)
    model, cfg, transform, ckpt = load_for_inference(checkpoint, dev)
    meta = ckpt["data"]
    name = dataset or cfg.data.name
    options = dict(cfg.data.options) if dataset is None else {}
    data_root = root if root is not None else (cfg.data.root if dataset is None else None)
    ds = build_checkpoint_dataset(cfg.data.root, name, split, root=root, dataset=dataset,
                                  image_size=meta["image_size"], **options)
    if ds.channels != meta["channels"]:
        raise DataError(f"dataset {name!r} has {ds.channels}-channel images but the checkpoint expects "
                        f"{meta['channels']}")
    groups = ds.sample_groups(within) if within else None
    desc = {"dataset": name, "split": split, "root": data_root, "options": options, "image_size": meta["image_size"],
            "mean": meta["mean"], "std": meta["std"], "preprocess": meta.get("preprocess", {})}
    key = feature_cache.feature_key(model.backbone.state_dict(), desc)
    feats, labels, _ = feature_cache.cached_features(
        checkpoint.parent / "features" if cache else None, split, key, ds.labels,
        lambda: extract_features(model.backbone, ds, transform, batch_size, dev, show_progress=show_progress,
                                 desc=f"features {split}"))
    return feats, labels, list(ds.class_names), groups
