"""Dataset registry: ``build_dataset(name, split, root=None, image_size=None, download=False, **kw)``.

``build_dataset`` is this kind's ``create_X`` (``create_dataset`` is the same function, for the
uniform ``register_X`` / ``create_X`` / ``list_X`` surface); options are checked by
``DATASETS.create`` against the reader's typed signature.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .base import ImageDataset

DATASETS: Registry = Registry("dataset")


def register_dataset(name: str | None = None, *aliases: str, **meta: Any) -> Callable[[Any], Any]:
    """Decorator: register a reader ``f(split, root=None, image_size=None, download=False, ...)``."""
    return DATASETS.register(name, *aliases, **meta)


def build_dataset(name: str, split: str, root: str | None = None, image_size: int | None = None,
                  download: bool = False, **kwargs: Any) -> ImageDataset:
    """Build the named split of a registered dataset (each reader documents its splits)."""
    return DATASETS.create(name, split=split, root=root, image_size=image_size, download=download, **kwargs)


create_dataset = build_dataset


def list_datasets() -> list[str]:
    """Registered dataset names (aliases excluded), sorted."""
    return DATASETS.names()

