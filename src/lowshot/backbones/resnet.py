"""ImageNet-style ResNets / ResNeXt (He et al. 2016; Xie et al. 2017), without the fc layer.

Layouts and parameter counts match the torchvision definitions (ResNet v1.5: the stride
sits on the 3x3 conv of a Bottleneck), so results are comparable with the long-tail
literature (Decoupling uses ResNeXt-50 on ImageNet-LT, ResNet-10 in its ablations) and the
CloserLook / Negative-Margin few-shot ResNet-10/18.

Stem choice (``small_input``): the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) shrinks
inputs 4x before the first stage, which wastes most of a 32 px or 28 px image. With
``small_input=True`` the stem is a 3x3/1 conv and no max-pool (the CIFAR variant).
``small_input=None`` (default) picks it automatically when ``image_size <= 64``; 84 px
mini-ImageNet and 224 px inputs keep the ImageNet stem, as in the reference few-shot code.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import check_common, init_conv_bn, register_backbone, require

SMALL_INPUT_MAX_SIZE = 64


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1, base_width=64")
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """Stem + 4 stages (widths 64-128-256-512 x expansion) + global average pool."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        small_input: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.small_input = small_input
        if small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        stages: list[nn.Module] = []
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, groups, width_per_group))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = cin
        init_conv_bn(self)
        if zero_init_residual:  # each block starts as identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"small_input={self.small_input}, out_dim={self.out_dim}"


def _build(
    name: str,
    block: type[BasicBlock] | type[Bottleneck],
    layers: tuple[int, int, int, int],
    in_channels: int,
    image_size: int | None,
    small_input: bool | None,
    zero_init_residual: bool,
    groups: int = 1,
    width_per_group: int = 64,
) -> ResNet:
    check_common(name, in_channels, image_size)
    require(
        small_input in (None, True, False),
        f"backbone {name!r}: small_input must be true, false or null, got {small_input!r}",
    )
    if small_input is None:
        small_input = image_size is not None and image_size <= SMALL_INPUT_MAX_SIZE
    return ResNet(
        block, layers, in_channels, bool(small_input), groups, width_per_group, zero_init_residual
    )


@register_backbone("resnet10")
def resnet10(
    in_channels: int = 3,
    image_size: int | None = None,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-10 (BasicBlock x [1,1,1,1], 512-d): CloserLook / Decoupling's small ResNet."""
    return _build(
        "resnet10",
        BasicBlock,
        (1, 1, 1, 1),
        in_channels,
        image_size,
        small_input,
        zero_init_residual,
    )


@register_backbone("resnet18")
def resnet18(
    in_channels: int = 3,
    image_size: int | None = None,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 (BasicBlock x [2,2,2,2], 512-d, 11.18M parameters)."""
    return _build(
        "resnet18",
        BasicBlock,
        (2, 2, 2, 2),
        in_channels,
        image_size,
        small_input,
        zero_init_residual,
    )


@register_backbone("resnet34")
def resnet34(
    in_channels: int = 3,
    image_size: int | None = None,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-34 (BasicBlock x [3,4,6,3], 512-d, 21.28M parameters)."""
    return _build(
        "resnet34",
        BasicBlock,
        (3, 4, 6, 3),
        in_channels,
        image_size,
        small_input,
        zero_init_residual,
    )


@register_backbone("resnet50")
def resnet50(
    in_channels: int = 3,
    image_size: int | None = None,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 (Bottleneck x [3,4,6,3], 2048-d, 23.51M parameters)."""
    return _build(
        "resnet50",
        Bottleneck,
        (3, 4, 6, 3),
        in_channels,
        image_size,
        small_input,
        zero_init_residual,
    )


@register_backbone("resnext50_32x4d", "resnext50")
def resnext50_32x4d(
    in_channels: int = 3,
    image_size: int | None = None,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNeXt-50 32x4d (Bottleneck, 32 groups of width 4, 2048-d, 22.98M parameters)."""
    return _build(
        "resnext50_32x4d",
        Bottleneck,
        (3, 4, 6, 3),
        in_channels,
        image_size,
        small_input,
        zero_init_residual,
        32,
        4,
    )
