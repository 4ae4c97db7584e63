"""Long-tailed versions of balanced datasets: ``fashion_mnist_lt``, ``cifar10_lt``, ``cifar100_lt``.

Splits (all deterministic in ``seed``):

* ``val``: ``val_per_class`` images per class carved from the official TRAIN partition before
  subsampling: balanced like the test set and disjoint from training, for choosing tau, epochs...
  without touching the test set (the official code tunes tau on test).
* ``train``: the long-tailed subset (``make_longtail``) of the remaining train images; the head
  class keeps ``n_max`` = its remaining count unless given.
* ``test``: the official balanced test partition.

Default validation sizes keep the imbalance factor exact (IF divides n_max):
Fashion-MNIST 1000/class -> 5000..50 at IF=100, the same counts as the standard CIFAR-10-LT;
CIFAR-10 500/class -> 4500..45; CIFAR-100 100/class -> 400..4. ``val_per_class=0`` reproduces the
literature's CIFAR-LT counts (5000..50, 500..5) but then there is no ``val`` split.
Any other balanced registered dataset works through ``base_dataset=...``; extra keyword
arguments go to the base reader (e.g. ``channels=3`` for Fashion-MNIST).
"""
from __future__ import annotations

from typing import Any

from .base import ImageDataset
from .registry import DATASETS, build_dataset, register_dataset
from ..errors import ConfigError, DataError
from .longtail import balanced_split, make_longtail

LT_SPLITS = ("train", "val", "test")


def build_longtail(name: str, base_dataset: str, split: str, root: str | None = None,
                   image_size: int | None = None, download: bool = False, *, imbalance_factor: float = 100,
                   profile: str = "exp", seed: int = 0, val_per_class: int = 0, n_max: int | None = None,
                   mu: float = 0.5, **base_kw: Any) -> ImageDataset:
    """The ``split`` of a long-tailed version of ``base_dataset`` (see the module docstring)."""
    if split not in LT_SPLITS:
        raise ConfigError(f"unknown split {split!r} for dataset {name!r} (choose from {', '.join(LT_SPLITS)})")
    if base_dataset not in DATASETS:
        raise ConfigError(f"{name}: base dataset {base_dataset!r} is not registered; import the module "
                          f"that defines it (known: {', '.join(DATASETS.names())})")
    try:  # an option neither we nor the base reader know
        base_kw = DATASETS.check(base_dataset, base_kw)
    except ConfigError as err:
        raise ConfigError(f"dataset {name!r}: {err}") from None

    def base(part: str) -> ImageDataset:
        return build_dataset(base_dataset, part, root=root, image_size=image_size, download=download, **base_kw)

    if split == "test":
        return base("test")
    if split == "val" and val_per_class == 0:
        raise DataError(f"{name}: no 'val' split with val_per_class=0; pass val_per_class > 0")
    full = base("train")
    val_idx, rest = balanced_split(full.labels, val_per_class, seed=seed, num_classes=full.num_classes)
    if split == "val":
        return full.subset(val_idx)
    keep = make_longtail(full.labels[rest], imbalance_factor, profile, seed, n_max=n_max, mu=mu,
                         num_classes=full.num_classes)
    return full.subset(rest[keep])


def _register(name: str, base: str, val_default: int, *aliases: str) -> None:
    def factory(split: str, root: str | None = None, image_size: int | None = None, download: bool = False,
                *, base_dataset: str = base, imbalance_factor: float = 100, profile: str = "exp", seed: int = 0,
                val_per_class: int = val_default, n_max: int | None = None, mu: float = 0.5,
                **base_kw: Any) -> ImageDataset:
        return build_longtail(name, base_dataset, split, root, image_size, download,
                              imbalance_factor=imbalance_factor, profile=profile, seed=seed,
                              val_per_class=val_per_class, n_max=n_max, mu=mu, **base_kw)

    factory.__name__ = name
    factory.__doc__ = (f"Long-tailed {base} (splits train / val / test; val_per_class={val_default} by "
                       f"default). See ``lowshot.data.lt_subsets``.")
    register_dataset(name, *aliases)(factory)


_register("fashion_mnist_lt", "fashion_mnist", 1000, "fmnist_lt")
_register("cifar10_lt", "cifar10", 500)
_register("cifar100_lt", "cifar100", 100)
