"""The backbone registry and the checks every factory shares.

Factories are registered with ``@register_backbone("name")`` and built with
``create_backbone(name, in_channels=3, **kw)``; unknown names and unknown options are
user mistakes, so both raise :class:`~lowshot.errors.ConfigError` naming the culprit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


def register_backbone(name: str | None = None, *aliases: str, **meta: Any) -> Callable[[Any], Any]:
    """Decorator: register a typed factory ``f(in_channels=3, image_size=None, ...) -> nn.Module``."""
    return BACKBONES.register(name, *aliases, **meta)


def list_backbones() -> list[str]:
    """Registered backbone names (aliases excluded), sorted."""
    return BACKBONES.names()


def create_backbone(name: str, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build backbone ``name`` (options checked by ``BACKBONES.create``); the result has ``.out_dim`` and maps [N,C,H,W] -> [N,out_dim]."""
    canonical = BACKBONES.canonical(name)
    model = BACKBONES.create(canonical, in_channels=in_channels, **kw)
    if not isinstance(getattr(model, "out_dim", None), int):
        raise TypeError(f"backbone factory {canonical!r} returned a module without an int .out_dim")
    return model


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds (argument validation)."""
    if not condition:
        raise ConfigError(message)


def check_common(name: str, in_channels: int, image_size: int | None) -> None:
    """Validate the two arguments every backbone factory takes."""
    require(
        isinstance(in_channels, int) and not isinstance(in_channels, bool) and in_channels >= 1,
        f"backbone {name!r}: in_channels must be a positive int, got {in_channels!r}",
    )
    require(
        image_size is None
        or (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1),
        f"backbone {name!r}: image_size must be a positive int or None, got {image_size!r}",
    )


def init_conv_bn(module: nn.Module, nonlinearity: str = "relu") -> None:
    """He (fan_out) init for convs, BN to identity: the init all reference few-shot nets use."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
