"""Long-tailed subsets of balanced datasets, and balanced held-out splits.

Kang et al. (ICLR 2020) evaluate on long-tailed *training* sets with *balanced* validation and
test sets; these helpers build exactly that from any labelled dataset, deterministically:

* ``longtail_counts`` is the pure count profile (exponential or step), so it can be tested and
  printed without touching data;
* ``make_longtail`` picks which images to keep, seeded, one fixed random order per class, so
  the subset for a larger imbalance factor is nested inside the one for a smaller factor
  (same seed and ``n_max``): comparisons across imbalance factors only ever remove images;
* ``balanced_split`` carves a class-balanced validation split from training data (used before
  subsampling, so validation is balanced and disjoint from the long-tailed training subset).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError, DataError

PROFILES = ("exp", "step")


def _as_labels(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if lab.numel() and int(lab.min()) < 0:
        raise DataError(f"labels must be >= 0, got {int(lab.min())}")
    return lab


def class_counts(labels: Sequence[int] | torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Images per class as a LongTensor [C] (C = ``num_classes`` or max label + 1)."""
    lab = _as_labels(labels)
    if num_classes is not None and lab.numel() and int(lab.max()) >= num_classes:
        raise DataError(f"label {int(lab.max())} out of range for num_classes={num_classes}")
    return torch.bincount(lab, minlength=num_classes or 0)


def class_indices(labels: Sequence[int] | torch.Tensor, num_classes: int | None = None) -> list[torch.Tensor]:
    """Indices of each class (ascending), in O(N log N) rather than one scan per class."""
    lab = _as_labels(labels)
    counts = class_counts(lab, num_classes)
    order = torch.sort(lab, stable=True).indices
    return list(torch.split(order, counts.tolist()))


def _floor(x: float) -> int:
    """floor() that is robust to 9.999999999 when the exact value is an integer."""
    n = math.floor(x)
    return n + 1 if x - n > 1 - 1e-9 else n


def longtail_counts(num_classes: int, imbalance_factor: float, n_max: int, profile: str = "exp",
                    *, mu: float = 0.5) -> list[int]:
    """Per-class image counts of a long-tailed profile, head class first.

    ``exp``: n_i = floor(n_max * IF^(-i/(C-1))) (Cui et al. 2019 / Cao et al. 2019, CIFAR-LT).
    ``step``: the first C - round(mu*C) classes keep n_max, the last round(mu*C) keep
    floor(n_max / IF) (mu = fraction of minority classes, 0.5 in Cao et al.).
    The realised ratio n_0 / n_{C-1} equals IF exactly when IF divides n_max.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if not imbalance_factor >= 1:
        raise ConfigError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if n_max < 1:
        raise ConfigError(f"n_max must be >= 1, got {n_max}")
    if profile not in PROFILES:
        raise ConfigError(f"unknown long-tail profile {profile!r} (known: {', '.join(PROFILES)})")
    C, IF = num_classes, float(imbalance_factor)
    if C == 1:
        return [int(n_max)]
    if profile == "exp":
        counts = [_floor(n_max * IF ** (-i / (C - 1))) for i in range(C)]
    else:
        if not 0 < mu < 1:
            raise ConfigError(f"step profile: mu must be in (0, 1), got {mu}")
        n_minor = min(max(int(round(mu * C)), 1), C - 1)
        counts = [int(n_max)] * (C - n_minor) + [_floor(n_max / IF)] * n_minor
    if counts[-1] < 1:
        raise ConfigError(f"imbalance_factor={imbalance_factor} with n_max={n_max} leaves the tail class "
                          f"with no image; lower the imbalance factor or raise n_max")
    return counts


def make_longtail(labels: Sequence[int] | torch.Tensor, imbalance_factor: float, profile: str = "exp",
                  seed: int = 0, *, n_max: int | None = None, mu: float = 0.5,
                  order: Sequence[int] | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Indices (sorted, LongTensor) of a long-tailed subset of a labelled dataset.

    Class ``order[i]`` (default: label order, class 0 is the head) keeps the i-th count of
    ``longtail_counts``. ``n_max`` defaults to the number of images of the head class; a class
    with fewer images than its target count raises ``DataError`` (we never silently change the
    profile). Within each class the kept images are a prefix of one seeded random permutation,
    so subsets for different imbalance factors are nested.
    """
    lab = _as_labels(labels)
    counts = class_counts(lab, num_classes)
    C = int(counts.numel())
    if C == 0:
        raise DataError("cannot build a long-tailed subset of an empty dataset")
    order_l = list(range(C)) if order is None else [int(c) for c in order]
    if sorted(order_l) != list(range(C)):
        raise ConfigError(f"order must be a permutation of 0..{C - 1}, got {order_l}")
    if n_max is None:
        n_max = int(counts[order_l[0]])
    target = longtail_counts(C, imbalance_factor, n_max, profile, mu=mu)
    groups = class_indices(lab, C)
    gen = torch.Generator().manual_seed(int(seed))
    kept: list[torch.Tensor] = []
    for rank, c in enumerate(order_l):  # one permutation per class, consumed in a fixed order
        idx = groups[c]
        perm = idx[torch.randperm(idx.numel(), generator=gen)]
        if target[rank] > idx.numel():
            raise DataError(f"class {c} has {idx.numel()} images but the {profile} profile "
                            f"(imbalance_factor={imbalance_factor}, n_max={n_max}) needs {target[rank]}")
        kept.append(perm[: target[rank]])
    return torch.sort(torch.cat(kept)).values


def balanced_split(labels: Sequence[int] | torch.Tensor, per_class: int, seed: int = 0,
                   *, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(split, rest): ``per_class`` seeded images of every class, and all remaining indices.

    Both are sorted LongTensors. Raises ``DataError`` naming the class when a class has fewer
    than ``per_class`` images (a balanced split must be balanced).
    """
    if per_class < 0:
        raise ConfigError(f"per_class must be >= 0, got {per_class}")
    lab = _as_labels(labels)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.zeros(lab.numel(), dtype=torch.bool)
    for c, idx in enumerate(class_indices(lab, num_classes)):
        if idx.numel() < per_class:
            raise DataError(f"class {c} has {idx.numel()} images, fewer than the {per_class} per class "
                            f"needed for a balanced split")
        chosen[idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]] = True
    return torch.nonzero(chosen).reshape(-1), torch.nonzero(~chosen).reshape(-1)
