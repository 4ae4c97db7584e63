"""Per-episode reference fine-tune: the plain loop public implementations run.

One ``nn.Module`` head and one ``torch.optim.SGD`` per episode, autograd for gradients, the
same initial weights and shuffles as the batched solver (``episode_draws``).  It exists to
prove the batched solver exact (tests) and as the baseline in benchmarks/meta_test_speed.py.
The heads are plain modules with the formulas of ``lowshot.heads`` ("cosine" with margin 0,
"linear") so this file does not depend on that package.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .finetune import FinetuneConfig, episode_draws


class CosineHead(nn.Module):
    """``scale * cos(x, w_c)``: features and weight rows L2-normalised (no margin, no bias)."""

    def __init__(self, weight: Tensor, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x), F.normalize(self.weight))


class LinearHead(nn.Module):
    """``scale * (W x + b)`` (``nn.Linear``)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(x, self.weight, self.bias)


def finetune_reference(cfg: FinetuneConfig, features: Tensor, episodes: Tensor, shot: int,
                       seed: int, start: int = 0) -> Tensor:
    """Query logits ``[E, way * query, way]``, one episode at a time (slow, obviously right)."""
    e, way, _ = episodes.shape
    n, dim, dtype, dev = way * shot, features.shape[1], features.dtype, features.device
    steps = cfg.num_steps(n, shot)
    per_pass = math.ceil(n / cfg.batch_size)
    passes = max(1, math.ceil(steps / per_pass))
    draws = episode_draws(seed, start, start + e, way, dim, n, passes)
    y = torch.arange(way, device=dev).repeat_interleave(shot)
    outs = []
    for i in range(e):
        w0 = draws.weight[i].to(dev, dtype)
        if cfg.head == "cosine":
            head: nn.Module = CosineHead(w0, float(cfg.scale))
        else:
            b0 = draws.bias[i].to(dev, dtype) if cfg.has_bias else None
            head = LinearHead(w0, b0, float(cfg.scale))
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              dampening=cfg.dampening, weight_decay=cfg.weight_decay)
        x = features[episodes[i, :, :shot].reshape(-1).to(dev)]
        for t in range(steps):
            p, j = divmod(t, per_pass)
            idx = draws.perms[i, p, j * cfg.batch_size:(j + 1) * cfg.batch_size].to(dev, torch.int64)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            outs.append(head(features[episodes[i, :, shot:].reshape(-1).to(dev)]))
    return torch.stack(outs)
