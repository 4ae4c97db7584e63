"""The head registry and :class:`Head`, the base class every classifier head derives from.

A head owns ``.weight`` (num_classes, embedding_size) and maps features to logits with
``forward(features, labels=None)``. Margins (and the virtual class) are a *training*
device: they apply only when labels are given AND the module is in training mode, so
``head.eval()(features)`` always returns the plain, margin-free logits used to predict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")

# The meta-test (per-episode fine-tune) head of each head family. The Negative-Margin code
# fine-tunes a fresh head of the TRAINING head's metric type with ``metric_params_test``
# (bl0/negative-margin.few-shot lib/model.py:58 ``get_linear_clf(self.metric_type, ...,
# **self.metric_params)``, main.py:171-175 ``metric_type=cfg.method.metric,
# metric_params=cfg.method.metric_params_test``, lib/config.py:83-86 ``scale_factor=5,
# margin=0.0``), so:
# * ``linear``: ``nn.Linear`` with bias at scale 1 (lib/model.py:10-11 ignores scale/margin);
# * ``neg_softmax``: ``SoftmaxMargin(scale 5, margin 0)``, no bias (lib/model.py:16-17, lib/metric.py SoftmaxMargin,
#   whose row-min shift cancels in the softmax) = our linear head, bias=False, scale=5;
# * ``cosine``: ``CosineSimilarity`` / ``AddMarginProduct`` at scale 5, margin 0 (the fine-tune
#   cosine head's default scale is 5); ArcFace at margin 0 is the same cosine head;
# * ``virtual_softmax`` (not in bl0): its test-time logits are ``W x`` (no bias, scale 1) and the
#   virtual class is a training device, so the fresh head is linear, bias=False, scale 1.
FAMILY_FINETUNE: dict[str, dict[str, Any]] = {
    "linear": {"head": "linear"},
    "neg_softmax": {"head": "linear", "bias": False, "scale": 5.0},
    "cosine": {"head": "cosine"},
    "virtual_softmax": {"head": "linear", "bias": False},
}
DEFAULT_FAMILY = "linear"


def register_head(name: str | None = None, *aliases: str, family: str | None = None,
                  finetune: dict[str, Any] | None = None, **meta: Any) -> Callable[[Any], Any]:
    """Decorator: register a factory ``f(num_classes, embedding_size, **options) -> Head``.

    ``family`` says which fresh head meta-tests a model trained with this head (``head_family``;
    one of ``FAMILY_FINETUNE``, default ``linear``); a head of a new family gives its fine-tune
    options itself (``finetune={"head": ..., ...}``), so a new head is a one-file change.
    """
    if finetune is None and family is not None and family not in FAMILY_FINETUNE:
        raise ValueError(f"head family {family!r} is not one of {sorted(FAMILY_FINETUNE)} "
                         f"(a new family gives finetune={{...}})")
    if finetune is not None:
        meta["finetune"] = dict(finetune)
    return HEADS.register(name, *aliases, family=family or DEFAULT_FAMILY, **meta)


def head_family(name: str) -> str:
    """The family a registered head (or alias) declared; ``linear`` when it declared none or is unknown."""
    if name not in HEADS:
        return DEFAULT_FAMILY
    return HEADS.meta(name).get("family", DEFAULT_FAMILY)


def finetune_head_options(name: str) -> dict[str, Any]:
    """Fine-tune options (``head``, and ``bias`` / ``scale`` where they differ from the defaults)
    that meta-test features of a model trained with head ``name``, as the official code does."""
    meta = HEADS.meta(name) if name in HEADS else {}
    if "finetune" in meta:
        return dict(meta["finetune"])
    return dict(FAMILY_FINETUNE[meta.get("family", DEFAULT_FAMILY)])


def list_heads() -> list[str]:
    """Registered head names (aliases excluded), sorted."""
    return HEADS.names()


def create_head(name: str, num_classes: int, embedding_size: int, **kw: Any) -> nn.Module:
    """Build head ``name``; unknown names, unknown options and wrong-typed values raise ConfigError."""
    return HEADS.create(name, num_classes, embedding_size, **kw)


def _positive_int(value: Any, what: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"head {head!r}: {what} must be a positive int, got {value!r}")
    return value


def _finite_float(value: Any, what: str, head: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"head {head!r}: {what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"head {head!r}: {what} must be > 0, got {value!r}")
    return float(value)


class Head(nn.Module):
    """Base class: weight init as ``nn.Linear`` (what the reference heads use), input checks."""

    head_name = "head"

    def __init__(self, num_classes: int, embedding_size: int, bias: bool = False) -> None:
        super().__init__()
        self.num_classes = _positive_int(num_classes, "num_classes", self.head_name)
        self.embedding_size = _positive_int(embedding_size, "embedding_size", self.head_name)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.embedding_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def _check(self, features: torch.Tensor, labels: torch.Tensor | None) -> bool:
        """Validate shapes; return whether the training-time modification applies."""
        if features.dim() != 2 or features.shape[1] != self.embedding_size:
            raise ConfigError(
                f"head {self.head_name!r} expects features of shape (N, {self.embedding_size}) "
                f"(embedding_size), got {tuple(features.shape)}"
            )
        if labels is None:
            return False
        if labels.shape != features.shape[:1]:
            raise ConfigError(
                f"head {self.head_name!r}: labels must have shape ({features.shape[0]},), "
                f"got {tuple(labels.shape)}"
            )
        return self.training

    def linear_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)`` (detached) with eval logits = ``W f + b``; heads without that form refuse.

        Stage-2 methods that rescale classifier rows (tau-norm, LWS) ask the head for this, so a
        new inner-product head only overrides this method.
        """
        raise ConfigError(f"the checkpoint's head {self.head_name!r} is not an inner-product classifier "
                          f"(eval logits = W f + b; it does not implement Head.linear_parts); use crt or ncm")

    def score_form(self) -> dict[str, Any]:
        """Eval logits as ``scale * (phi(x) . w_j + b_j)``: ``{kind, weight, scale, bias, center, metric}``.

        ``kind`` ``linear`` (phi(x) = x), ``cosine`` (x and rows normalised) or ``ncm`` (centred,
        normalised x against class means). Generalized few-shot adds novel rows in this form
        (``BaseClassifier.from_head``); the default is the ``linear_parts`` at scale 1.
        """
        weight, bias = self.linear_parts()
        return {"kind": "linear", "weight": weight, "scale": 1.0, "bias": bias}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


def replace_target(
    logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """``logits`` with column ``labels[i]`` of row i replaced by ``target[i]`` (out of place)."""
    return logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1))


def target_values(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``values[i, labels[i]]`` for every row i."""
    return values.gather(1, labels.unsqueeze(1)).squeeze(1)
