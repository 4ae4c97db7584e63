"""DropBlock (Ghiasi et al., NeurIPS 2018): dropout of contiguous square regions.

Plain dropout barely regularises conv maps because neighbours carry the same information;
dropping whole ``block_size x block_size`` squares does. Used in ResNet-12's last two
stages by MetaOptNet and the Negative-Margin recipes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def seed_probability(drop_rate: float, block_size: int, height: int, width: int) -> float:
    """Bernoulli rate gamma of block *seeds* so that ~``drop_rate`` of the units get dropped.

    gamma = drop_rate / block_size**2 * (H*W) / ((H - bs + 1) * (W - bs + 1)): each seed
    drops bs**2 units and seeds only exist where a full block fits (the paper's eq. 1).
    Overlapping blocks make the realised fraction deviate slightly; the exact expectation is
    ``mean(1 - (1 - gamma) ** k)`` with ``k`` the number of seeds covering a unit.
    """
    bs = min(block_size, height, width)
    valid = (height - bs + 1) * (width - bs + 1)
    return drop_rate / (bs * bs) * (height * width) / valid


def drop_block(x: torch.Tensor, drop_rate: float, block_size: int) -> torch.Tensor:
    """Apply DropBlock to ``x`` [N,C,H,W] (always: callers decide when training is on).

    Seeds are sampled independently per sample and channel; the kept units are rescaled by
    numel / kept so the batch's expected activation sum is preserved (as in the paper).
    """
    if drop_rate <= 0.0:
        return x
    n, c, h, w = x.shape
    bs = min(block_size, h, w)
    gamma = seed_probability(drop_rate, bs, h, w)
    seeds = torch.rand(n, c, h - bs + 1, w - bs + 1, device=x.device) < gamma
    # A unit is dropped if a seed sits anywhere in the bs x bs window whose top-left corner
    # is at most bs-1 above/left of it: pad seeds by bs-1 and max-pool with a bs window.
    dropped = F.max_pool2d(F.pad(seeds.to(x.dtype), (bs - 1, bs - 1, bs - 1, bs - 1)), bs, stride=1)
    keep = 1.0 - dropped
    kept = keep.sum().clamp_min(1.0)
    return x * keep * (keep.numel() / kept)


class DropBlock(nn.Module):
    """DropBlock layer; identity in eval mode or when ``drop_rate`` is 0.

    ``forward(x, drop_rate=None)`` may override the rate per call, which is how ResNet-12
    implements its linear ramp-up schedule.
    """

    def __init__(self, drop_rate: float = 0.1, block_size: int = 5) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"DropBlock drop_rate must be in [0, 1), got {drop_rate!r}")
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ConfigError(f"DropBlock block_size must be a positive int, got {block_size!r}")
        self.drop_rate = float(drop_rate)
        self.block_size = block_size

    def forward(self, x: torch.Tensor, drop_rate: float | None = None) -> torch.Tensor:
        rate = self.drop_rate if drop_rate is None else drop_rate
        if not self.training or rate <= 0.0:
            return x
        return drop_block(x, rate, self.block_size)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"
