"""Conv-4 / Conv-6: the small few-shot ConvNets (Vinyals et al. 2016; CloserLook, Chen et al. 2019).

Each block is conv3x3 (padding 1, with bias) -> BatchNorm -> ReLU [-> maxpool 2]. The
classic embedding flattens the last map (64 x 5 x 5 = 1600-d at 84 px, 64-d at 28 px), so
the output size depends on the input size: the factory needs ``image_size`` to report
``out_dim``. ``pool="avg"`` global-average-pools instead (``hidden``-d at any size).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .registry import check_common, init_conv_bn, register_backbone, require

_POOLS = ("flatten", "avg")


class ConvNet(nn.Module):
    """``depth`` conv blocks; only the first ``num_pools`` blocks end with a 2x2 max-pool."""

    def __init__(
        self,
        depth: int,
        num_pools: int,
        in_channels: int = 3,
        hidden: int = 64,
        image_size: int | None = None,
        pool: str = "flatten",
        name: str = "conv",
    ) -> None:
        super().__init__()
        check_common(name, in_channels, image_size)
        require(
            isinstance(hidden, int) and hidden >= 1,
            f"backbone {name!r}: hidden must be a positive int, got {hidden!r}",
        )
        require(pool in _POOLS, f"backbone {name!r}: pool must be one of {_POOLS}, got {pool!r}")
        self.name, self.pool, self.hidden = name, pool, hidden
        blocks: list[nn.Module] = []
        for i in range(depth):
            layers: list[nn.Module] = [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=True),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
            if i < num_pools:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.num_pools = num_pools
        # Spatial side after the pools: each floor-halves, so it is image_size // 2**num_pools.
        self.image_size = 84 if image_size is None else image_size
        self.final_side = self.image_size // (2**num_pools)
        if pool == "flatten":
            require(
                self.final_side >= 1,
                f"backbone {name!r}: image_size={self.image_size} is too small for "
                f"{num_pools} max-pools (need >= {2**num_pools})",
            )
            self.out_dim = hidden * self.final_side * self.final_side
        else:
            self.out_dim = hidden
        init_conv_bn(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(images)
        if self.pool == "avg":
            return x.mean(dim=(2, 3))
        if x.shape[-1] != self.final_side or x.shape[-2] != self.final_side:
            raise ConfigError(
                f"backbone {self.name!r} was built for image_size={self.image_size} "
                f"(out_dim {self.out_dim}) but got {tuple(images.shape[-2:])} images; "
                f"pass image_size={images.shape[-1]} or pool='avg'"
            )
        return torch.flatten(x, 1)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, pool={self.pool!r}, out_dim={self.out_dim}"


@register_backbone("conv4")
def conv4(
    in_channels: int = 3, image_size: int | None = None, hidden: int = 64, pool: str = "flatten"
) -> ConvNet:
    """Conv-4: 4 pooled blocks; 1600-d at 84 px (the default size), 64-d at 28 px."""
    return ConvNet(4, 4, in_channels, hidden, image_size, pool, name="conv4")


@register_backbone("conv6")
def conv6(
    in_channels: int = 3, image_size: int | None = None, hidden: int = 64, pool: str = "flatten"
) -> ConvNet:
    """CloserLook's Conv-6: 6 blocks, pooling only in the first 4 (same out_dim as conv4)."""
    return ConvNet(6, 4, in_channels, hidden, image_size, pool, name="conv6")
