"""Inner-product heads: plain ``linear`` and the Negative-Margin paper's ``neg_softmax``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .registry import Head, _finite_float, register_head, replace_target, target_values


class LinearHead(Head):
    """logits = W x + b. The plain softmax classifier; ``labels`` are accepted and ignored."""

    head_name = "linear"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check(features, labels)
        return F.linear(features, self.weight, self.bias)

    def linear_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight.detach(), None if self.bias is None else self.bias.detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}"


class NegSoftmaxHead(Head):
    """Scaled softmax with an additive margin on the target inner product (Liu et al. 2020).

    logits_j = s * (w_j . x + b_j); in training with labels the target becomes
    s * (w_y . x + b_y - m). m < 0 is the paper's *negative* margin: it adds s*|m| to the
    target logit, i.e. the loss equals CE(s (Wx + b) + s|m| onehot(y), y). m > 0 is the
    usual large-margin variant. (The official code also subtracts each row's minimum
    before scaling; softmax is shift-invariant per row, so that changes no loss or
    prediction and is omitted here.)
    """

    head_name = "neg_softmax"

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float, scale: float, bias: bool
    ) -> None:
        super().__init__(num_classes, embedding_size, bias=bias)
        self.margin = _finite_float(margin, "margin", self.head_name)
        self.scale = _finite_float(scale, "scale", self.head_name, positive=True)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        use_margin = self._check(features, labels)
        logits = F.linear(features, self.weight, self.bias)
        if use_margin and self.margin != 0.0:
            assert labels is not None
            logits = replace_target(logits, labels, target_values(logits, labels) - self.margin)
        return self.scale * logits

    def score_form(self) -> dict[str, Any]:
        """Scale kept apart from the rows: novel rows added next to them train at the same scale."""
        b = None if self.bias is None else self.bias.detach()
        return {"kind": "linear", "weight": self.weight.detach(), "scale": float(self.scale), "bias": b}

    def linear_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """s (W f + b): the scale folded into the classifier."""
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        return w * self.scale, None if b is None else b * self.scale

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}, "
            f"bias={self.bias is not None}"
        )


@register_head("linear", "softmax", family="linear")
def linear(num_classes: int, embedding_size: int, bias: bool = True) -> LinearHead:
    """Plain linear classifier (bias on by default, like ``nn.Linear``)."""
    return LinearHead(num_classes, embedding_size, bias=bool(bias))


@register_head("neg_softmax", family="neg_softmax")
def neg_softmax(
    num_classes: int,
    embedding_size: int,
    margin: float = -0.3,
    scale: float = 5.0,
    bias: bool = False,
) -> NegSoftmaxHead:
    """Neg-Softmax. Defaults follow the official code's mini-ImageNet ResNet-18 recipe.

    scale 5.0 (bl0 ``configs/{miniImagenet,CUB}/exp_neg-softmax.yml``), margin -0.3 (mini-ImageNet
    ResNet-18, 1- and 5-shot: ``script/resnet18/miniImagenet_neg-softmax_1-shot.sh:9``,
    ``script/miniImagenet_neg-softmax_5-shot.sh:9``), no bias (``lib/metric.py`` SoftmaxMargin has
    none). The other official recipes: CUB ResNet-18 -0.05 (1-shot,
    ``script/resnet18/CUB_neg-softmax_1-shot.sh:9``) and -0.005 (5-shot,
    ``script/CUB_neg-softmax_5-shot.sh:9``); mini-ImageNet ResNet-12 -0.01 (1-shot) and -0.1 (5-shot),
    both at scale 10 (``script/resnet12/miniImagenet_neg-softmax_{1,5}-shot.sh:9-10``).
    """
    return NegSoftmaxHead(num_classes, embedding_size, margin, scale, bool(bias))
