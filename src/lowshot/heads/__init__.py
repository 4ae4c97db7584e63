"""Classifier heads: ``create_head(name, num_classes, embedding_size, **kw)``.

Each head has ``.weight`` (num_classes, embedding_size) and ``forward(features,
labels=None) -> logits``; margins / the virtual class apply only when labels are given and
the head is in training mode. Option names follow pytorch-metric-learning: ``margin``,
``scale``, ``bias``.

Registered (aliases in brackets), training target logit, defaults:

- ``linear`` [softmax]: w_y.x + b_y (no margin); bias=True
- ``neg_softmax``: s (w_y.x - m); margin=-0.3, scale=5, bias=False
- ``cosine`` [neg_cosine, cosface, normface]: s (cos t_y - m); margin=0, scale=30
- ``arcface``: s cos(t_y + m), monotone beyond [0, pi]; margin=0.5 rad, scale=64
- ``virtual_softmax`` [virtual]: W x plus a column ||W_y|| ||x||

"""

from __future__ import annotations

from . import linear, margin, virtual  # noqa: F401  (import registers the factories)
from . import ncm  # noqa: F401  (nearest-class-mean head, lowshot.longtail's NCM as a head)
from .linear import LinearHead, NegSoftmaxHead
from .margin import ArcFaceHead, CosineHead, arc_margin
from .registry import HEADS, Head, create_head, finetune_head_options, head_family, list_heads, register_head
from .virtual import VirtualSoftmaxHead

__all__ = [
    "HEADS",
    "ArcFaceHead",
    "CosineHead",
    "Head",
    "LinearHead",
    "NegSoftmaxHead",
    "VirtualSoftmaxHead",
    "arc_margin",
    "create_head",
    "finetune_head_options",
    "head_family",
    "list_heads",
    "register_head",
]
