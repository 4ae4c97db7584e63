"""The head registry and :class:`Head`, the base class every classifier head derives from.

A head owns ``.weight`` (num_classes, embedding_size) and maps features to logits with
``forward(features, labels=None)``. Margins (and the virtual class) are a *training*
device: they apply only when labels are given AND the module is in training mode, so
``head.eval()(features)`` always returns the plain, margin-free logits used to predict.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")


def register_head(name: str | None = None, *aliases: str) -> Callable[[Any], Any]:
    """Decorator: register a factory ``f(num_classes, embedding_size, **kw) -> Head``."""
    return HEADS.register(name, *aliases)


def list_heads() -> list[str]:
    """Registered head names (aliases excluded), sorted."""
    return HEADS.names()


def create_head(name: str, num_classes: int, embedding_size: int, **kw: Any) -> nn.Module:
    """Build head ``name``; unknown names or options raise ConfigError."""
    canonical = HEADS.canonical(name)
    factory = HEADS.get(canonical)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [n for n in params if n not in ("num_classes", "embedding_size")]
        unknown = sorted(set(kw) - set(accepted))
        if unknown:
            raise ConfigError(
                f"head {canonical!r} got unknown option(s) {', '.join(map(repr, unknown))} "
                f"(accepted: {', '.join(accepted) or 'none'})"
            )
    return factory(num_classes, embedding_size, **kw)


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
