"""Build backbone + head from a config, and rebuild them from a checkpoint."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .config import Config, config_from_checkpoint
from .errors import CheckpointError, ConfigError


class Classifier(nn.Module):
    """Backbone followed by a head; one module so DDP / compile / AMP wrap both at once."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(images), labels)


def head_kwargs(cfg: Config) -> dict[str, Any]:
    """Head keywords from the config; margin/scale only go to heads that take them."""
    from .heads import HEADS
    factory = HEADS.get(cfg.head.name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = dict(cfg.head.kwargs)
    for key, value, default in (("margin", cfg.head.margin, 0.0), ("scale", cfg.head.scale, None)):
        if value is None:
            continue
        if key in params or takes_any:
            kw[key] = value
        elif value != default:
            raise ConfigError(f"config key 'head.{key}': head {cfg.head.name!r} has no {key}")
    return kw


def build_model(cfg: Config, num_classes: int, in_channels: int, image_size: int | None) -> Classifier:
    from .backbones import create_backbone
    from .heads import create_head
    backbone = create_backbone(cfg.model.backbone, in_channels=in_channels, image_size=image_size,
                               **cfg.model.backbone_kwargs)
    head = create_head(cfg.head.name, num_classes, backbone.out_dim, **head_kwargs(cfg))
    return Classifier(backbone, head)


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Classifier, Config]:
    """Rebuild the trained model exactly as stored; says which part does not fit."""
    try:
        cfg = config_from_checkpoint(ckpt["config"])
        meta = ckpt["data"]
    except KeyError as e:
        raise CheckpointError(f"checkpoint lacks the {e.args[0]!r} entry (not a lowshot checkpoint?)") from None
    model = build_model(cfg, len(ckpt["class_names"]), meta["channels"], meta["image_size"])
    for part, module in (("model", model.backbone), ("head", model.head)):
        try:
            module.load_state_dict(ckpt[part])
        except (RuntimeError, KeyError) as e:
            what = f"backbone {cfg.model.backbone!r}" if part == "model" else f"head {cfg.head.name!r}"
            first = str(e).splitlines()[0][:300]
            raise CheckpointError(f"checkpoint weights do not fit the {what} built from its config: {first}") from None
    return model, cfg
