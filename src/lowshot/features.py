"""Frozen-feature extraction shared by eval, decouple, analyze and embed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data.base import ImageDataset
from .loader import BatchLoader
from .utils import progress


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: ImageDataset, transform: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 256, device: str | torch.device = "cpu", *, show_progress: bool = False,
                     desc: str = "features", channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 (CPU) and labels [N] for every sample, in dataset order."""
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


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cached_split_features(checkpoint: str | Path, split: str, *, dataset: str | None = None,
                          root: str | None = None, batch_size: int = 256, device: str = "auto",
                          show_progress: bool = True, cache: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features, labels and class names of a dataset split under a checkpoint, cached on disk.

    The cache lives in ``<checkpoint dir>/features/`` and is keyed by the checkpoint's content hash and
    the dataset/split/root/options, so a retrained or edited checkpoint never reuses stale features.
    """
    from .checkpoint import load_checkpoint, save_checkpoint
    from .embed import embed_dataset_split
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "best.pt"
    ckpt_cfg = load_checkpoint(checkpoint)["config"]["data"]
    key = json.dumps({"ckpt": _file_digest(checkpoint), "dataset": dataset or ckpt_cfg["name"], "split": split,
                      "root": root if dataset else (root or ckpt_cfg["root"]),
                      "options": {} if dataset else ckpt_cfg["options"]}, sort_keys=True, default=str)
    name = f"{checkpoint.stem}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    path = checkpoint.parent / "features" / name
    if cache and path.is_file():
        obj = load_checkpoint(path)
        return obj["features"], obj["labels"], list(obj["class_names"])
    out = embed_dataset_split(checkpoint, split, dataset=dataset, root=root, batch_size=batch_size, device=device,
                              show_progress=show_progress)
    feats, labels = torch.from_numpy(out["features"]), torch.from_numpy(out["labels"]).long()
    names = [str(c) for c in out["class_names"].tolist()]
    if cache:
        save_checkpoint({"kind": "features", "features": feats, "labels": labels, "class_names": names,
                         "key": key}, path)
    return feats, labels, names
