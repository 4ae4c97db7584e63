"""Wide ResNet (Zagoruyko & Komodakis 2016), WRN-28-10 as used in few-shot (S2M2, Neg-Margin).

Pre-activation basic blocks (BN-ReLU-conv3x3 twice, dropout between the convs), a 3x3
stem of 16 channels, three groups of (depth-4)/6 blocks at widths 16k-32k-64k with strides
1-2-2, a final BN-ReLU and global average pooling: 640-d for k=10. 36.47M parameters
without the classifier (the usual "36.5M" figure counts a 10-way fc as well).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import check_common, init_conv_bn, register_backbone, require


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.shortcut = (
            None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        # When the shape changes the projection sees the pre-activated input (original WRN).
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0.0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + identity


class WideResNet(nn.Module):
    def __init__(
        self, depth: int = 28, widen_factor: int = 10, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        require(
            (depth - 4) % 6 == 0 and depth >= 10,
            f"backbone 'wrn': depth must be 6n+4 (e.g. 28), got {depth!r}",
        )
        require(
            isinstance(widen_factor, int) and widen_factor >= 1,
            f"backbone 'wrn': widen_factor must be a positive int, got {widen_factor!r}",
        )
        require(0.0 <= dropout < 1.0, f"backbone 'wrn': dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                WideBlock(
                    widths[g] if i == 0 else widths[g + 1],
                    widths[g + 1],
                    stride if i == 0 else 1,
                    dropout,
                )
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.out_dim = widths[3]
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, dropout
        init_conv_bn(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(images))))
        return self.relu(self.bn(x)).mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, widen_factor={self.widen_factor}, dropout={self.dropout}, "
            f"out_dim={self.out_dim}"
        )


@register_backbone("wrn28_10", "wideresnet28_10")
def wrn28_10(
    in_channels: int = 3, image_size: int | None = None, dropout: float = 0.0
) -> WideResNet:
    """WRN-28-10 (640-d). ``dropout`` between the two convs of each block (0.3 in the WRN paper)."""
    check_common("wrn28_10", in_channels, image_size)
    return WideResNet(28, 10, in_channels, dropout)
