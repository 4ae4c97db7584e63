"""Dataset registry: ``build_dataset(name, split, root=None, image_size=None, download=False, **kw)``."""
from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import ImageDataset

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register


def build_dataset(name: str, split: str, root: str | None = None, image_size: int | None = None,
                  download: bool = False, **kwargs: Any) -> ImageDataset:
    """Build the named split of a registered dataset (each reader documents its splits)."""
    return DATASETS.create(name, split=split, root=root, image_size=image_size, download=download, **kwargs)


def list_datasets() -> list[str]:
    return DATASETS.names()

