"""Embedding networks: ``create_backbone(name, in_channels=3, **kw)`` -> module with ``.out_dim``.

Every backbone maps images [N, C, H, W] to embeddings [N, out_dim]; every factory accepts
``image_size`` (only the flattening ConvNets need it). Register your own with
``@register_backbone("name")`` on a factory taking ``in_channels`` and ``image_size``.
"""

from __future__ import annotations

from . import conv, resnet, resnet12, wrn  # noqa: F401  (import registers the factories)
from .dropblock import DropBlock, drop_block
from .registry import BACKBONES, create_backbone, list_backbones, register_backbone

__all__ = [
    "BACKBONES",
    "DropBlock",
    "create_backbone",
    "drop_block",
    "list_backbones",
    "register_backbone",
]
