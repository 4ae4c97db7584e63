"""Angular heads: ``cosine`` (NormFace / Baseline++ / CosFace / Neg-Cosine) and ``arcface``.

Both score classes by the cosine between the feature and the class weight, times a scale
s; they differ only in how the training-time margin m treats the target class y.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .registry import Head, _finite_float, register_head, replace_target, target_values


class _AngularHead(Head):
    def __init__(self, num_classes: int, embedding_size: int, margin: float, scale: float) -> None:
        super().__init__(num_classes, embedding_size, bias=False)
        self.margin = _finite_float(margin, "margin", self.head_name)
        self.scale = _finite_float(scale, "scale", self.head_name, positive=True)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """cos(theta_j) = <x/|x|, w_j/|w_j|>, shape (N, num_classes)."""
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def score_form(self) -> dict[str, Any]:
        return {"kind": "cosine", "weight": self.weight.detach(), "scale": float(self.scale)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"


class CosineHead(_AngularHead):
    """logits_j = s cos(theta_j); target in training: s (cos(theta_y) - m).

    m = 0: NormFace / Baseline++'s cosine classifier; m > 0: CosFace (AM-Softmax);
    m < 0: Neg-Cosine (Liu et al. 2020), which adds s|m| to the target logit.
    """

    head_name = "cosine"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        use_margin = self._check(features, labels)
        cos = self.cosine(features)
        if use_margin and self.margin != 0.0:
            assert labels is not None
            cos = replace_target(cos, labels, target_values(cos, labels) - self.margin)
        return self.scale * cos


def arc_margin(cos: torch.Tensor, margin: float) -> torch.Tensor:
    """psi(theta) = cos(theta + m) with a continuous, monotone extension; see ArcFaceHead.

    Computed from c = cos(theta) without acos: cos(theta + m) = c cos m - sin(theta) sin m,
    sin(theta) = sqrt(1 - c^2) >= 0 (theta in [0, pi]). Where theta + m would leave [0, pi]
    (theta > pi - m for m > 0, theta < -m for m < 0) cos(theta + m) turns non-monotone, so
    psi switches to c - sign(m) (1 - cos m): an additive cosine margin chosen to meet
    cos(theta + m) at the switch point (value -1, resp. +1). psi is continuous, decreasing
    in theta and 1-Lipschitz in theta, so its gradient w.r.t. features and weights stays
    bounded; the fallback region has d psi/dc = 1. The one remaining singular point is a
    cone tip (theta = 0 for m > 0, theta = pi for m < 0: sin(theta) has no derivative in c
    there); at exactly c = +-1 the sin term gets the subgradient 0, like d|x|/dx at 0.
    """
    if margin == 0.0:
        return cos
    c = cos.clamp(-1.0, 1.0)
    sin_sq = 1.0 - c * c
    positive = sin_sq > 0
    # sqrt's gradient is infinite at 0: feed it a harmless 1 there and mask the result, so
    # neither the value nor the backward pass ever touches the singularity.
    sin = torch.where(
        positive, torch.sqrt(torch.where(positive, sin_sq, torch.ones_like(sin_sq))), 0.0
    )
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    shifted = c * cos_m - sin * sin_m
    if margin > 0:
        in_range = c >= -cos_m  # theta <= pi - m
        fallback = c - (1.0 - cos_m)
    else:
        in_range = c <= cos_m  # theta >= -m
        fallback = c + (1.0 - cos_m)
    return torch.where(in_range, shifted, fallback)


class ArcFaceHead(_AngularHead):
    """logits_j = s cos(theta_j); target in training: s psi(theta_y), psi = cos(theta_y + m).

    Additive angular margin (Deng et al., CVPR 2019), m in radians, either sign
    (|m| < pi/2). Edge treatment (see :func:`arc_margin`): when theta_y + m leaves [0, pi]
    the target logit continues as the additive cosine margin c - sign(m) (1 - cos m), which
    keeps it continuous and monotone in theta; exact cos = +-1 give finite gradients (no
    acos, masked sqrt). This is the principled version of insightface's ``easy_margin=False``
    fallback (which uses c - m sin m and jumps at the switch).
    """

    head_name = "arcface"

    def __init__(self, num_classes: int, embedding_size: int, margin: float, scale: float) -> None:
        super().__init__(num_classes, embedding_size, margin, scale)
        if not abs(self.margin) < math.pi / 2:
            raise ConfigError(
                "head 'arcface': margin is an angle in radians and must satisfy |m| < pi/2, "
                f"got {margin!r}"
            )

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        use_margin = self._check(features, labels)
        cos = self.cosine(features)
        if use_margin and self.margin != 0.0:
            assert labels is not None
            cos = replace_target(cos, labels, arc_margin(target_values(cos, labels), self.margin))
        return self.scale * cos


@register_head("cosine", "neg_cosine", "cosface", "normface", family="cosine")
def cosine(
    num_classes: int, embedding_size: int, margin: float = 0.0, scale: float = 30.0
) -> CosineHead:
    """Cosine classifier. scale 30 = the official Neg-Margin training scale for every backbone
    (bl0 ``lib/config.py:80`` ``metric_params.scale_factor=30.0``; no neg-cosine script or config
    overrides it) and the default ``temperature`` of mmfewshot's NegMarginHead
    (``heads/neg_margin_head.py:30``), but every mmfewshot neg_margin recipe, Conv4 and ResNet-12
    alike, trains at temperature 10 (e.g. ``neg-margin_cosine_conv4_1xb64_mini-imagenet_5way-1shot.py:50``);
    both meta-test at 5. margin 0 (pass e.g. -0.02 for the official mini-ImageNet ResNet-12
    Neg-Cosine 1-shot recipe, 0.35 for CosFace)."""
    return CosineHead(num_classes, embedding_size, margin, scale)


@register_head("arcface", family="cosine")
def arcface(
    num_classes: int, embedding_size: int, margin: float = 0.5, scale: float = 64.0
) -> ArcFaceHead:
    """ArcFace with the paper's defaults m = 0.5 rad, s = 64."""
    return ArcFaceHead(num_classes, embedding_size, margin, scale)
