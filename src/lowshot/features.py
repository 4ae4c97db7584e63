"""Frozen-feature extraction shared by eval, decouple, analyze and embed."""
from __future__ import annotations

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
