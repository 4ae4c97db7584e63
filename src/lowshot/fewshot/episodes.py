"""Reproducible N-way K-shot episode sampling, vectorised over episodes.

An episode tensor ``[episodes, way, shot + query]`` holds *sample indices*: row ``e``, column
block ``c`` lists the samples of the episode's ``c``-th class (its episode-local label is
``c``); the first ``shot`` are the support set, the rest the queries.  Every draw comes from
one CPU ``torch.Generator`` with float64 keys (ties have probability ~2^-53, and ``topk``
on distinct keys is deterministic), so a seed gives the same tensor on any machine.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

# Bound on the float64 key matrix drawn at once when picking samples within classes.
_MAX_KEYS = 1 << 22


def as_label_tensor(labels: Any) -> Tensor:
    """Labels as a 1-D int64 CPU tensor (accepts tensors, numpy arrays, lists of ints)."""
    t = labels.detach() if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if t.dim() != 1:
        raise DataError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"labels must be integers, got dtype {t.dtype}")
    if t.is_floating_point() and bool((t != t.round()).any()):
        raise DataError("labels must be integers, got non-integral floats")
    return t.to("cpu", torch.int64)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _class_desc(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return f"class {label} ({class_names[label]!r})"
    return f"class {label}"


def sample_episodes(
    labels: Any,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int = 0,
    *,
    groups: Any = None,
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """Draw ``episodes`` few-shot tasks; returns LongTensor ``[episodes, way, shot + query]``.

    Classes of an episode are distinct and uniformly drawn; within a class, ``shot + query``
    distinct samples are drawn uniformly (so support and query never overlap).  Every class
    must have at least ``shot + query`` samples — we refuse rather than silently dropping
    classes, because that would change the task distribution behind the reported accuracy.
    ``class_names[i]`` (optional) names label value ``i`` in error messages.

    ``groups`` (optional, one id per sample: ints or strings, e.g. the Omniglot alphabet) makes
    every episode draw all of its ``way`` classes from one group, the group chosen uniformly
    among the groups with at least ``way`` classes (Lake et al.'s within-alphabet protocol).
    Every sample of a class must carry the same group id.
    """
    way = _check_int("way", way, 1)
    shot = _check_int("shot", shot, 1)
    query = _check_int("query", query, 0)
    episodes = _check_int("episodes", episodes, 1)
    seed = _check_int("seed", seed, 0)
    y = as_label_tensor(labels)
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    k = classes.numel()
    if k < way:
        raise DataError(f"{way}-way episodes need at least {way} classes, the labels have {k}")
    need = shot + query
    short = (counts < need).nonzero().flatten().tolist()
    if short:
        first = short[0]
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise DataError(
            f"{_class_desc(int(classes[first]), class_names)} has {int(counts[first])} samples, "
            f"fewer than shot + query = {shot} + {query} = {need}{more}")

    gen = torch.Generator().manual_seed(seed)
    # Distinct classes per episode: the `way` smallest of K iid keys (uniform subset, random order).
    class_keys = torch.rand(episodes, k, generator=gen, dtype=torch.float64)
    if groups is not None:
        class_group, group_names = _class_groups(groups, inverse, k, classes, class_names)
        sizes = torch.bincount(class_group, minlength=len(group_names))
        eligible = (sizes >= way).nonzero().flatten()
        if eligible.numel() == 0:
            listing = ", ".join(f"{group_names[g]!r} ({int(sizes[g])})" for g in range(len(group_names)))
            raise DataError(f"within-group {way}-way episodes need a group with at least {way} classes; "
                            f"classes per group: {listing}")
        pick = eligible[torch.randint(eligible.numel(), (episodes,), generator=gen)]   # [E]
        class_keys.masked_fill_(class_group.unsqueeze(0) != pick.unsqueeze(1), 2.0)   # other groups never win
    chosen = class_keys.topk(way, dim=1, largest=False, sorted=True).indices  # [E, way]

    order = torch.argsort(inverse, stable=True)            # sample ids grouped by class
    offsets = torch.cumsum(counts, 0) - counts            # first slot of each class in `order`
    max_count = int(counts.max())
    cnt = counts[chosen]                                   # [E, way]
    out = torch.empty(episodes, way, need, dtype=torch.int64)
    step = max(1, _MAX_KEYS // (way * max_count))
    ar = torch.arange(max_count)
    for s in range(0, episodes, step):
        c = cnt[s:s + step]
        keys = torch.rand(c.shape[0], way, max_count, generator=gen, dtype=torch.float64)
        keys.masked_fill_(ar >= c.unsqueeze(-1), 2.0)      # slots beyond the class size never win
        ranks = keys.topk(need, dim=-1, largest=False, sorted=True).indices
        out[s:s + step] = order[offsets[chosen[s:s + step]].unsqueeze(-1) + ranks]
    return out


def _class_groups(groups: Any, inverse: Tensor, k: int, classes: Tensor,
                  class_names: Sequence[str] | None) -> tuple[Tensor, list[Any]]:
    """Group index per class (``[K]``) and the group names; refuses a class split over groups."""
    values = np.asarray(groups.detach().cpu() if isinstance(groups, Tensor) else groups)
    if values.ndim != 1 or values.shape[0] != inverse.numel():
        raise DataError(f"groups must give one id per sample ({inverse.numel()}), got shape {values.shape}")
    names, codes = np.unique(values, return_inverse=True)
    codes_t = torch.as_tensor(codes.astype(np.int64))
    per_class = torch.full((k,), -1, dtype=torch.int64)
    per_class.scatter_(0, inverse, codes_t)               # last writer wins; checked next
    if bool((per_class[inverse] != codes_t).any()):
        bad = int(inverse[(per_class[inverse] != codes_t).nonzero()[0]])
        raise DataError(f"{_class_desc(int(classes[bad]), class_names)} has samples in more than one group")
    return per_class, list(names.tolist())


def episode_labels(way: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """Episode-local labels ``[0]*count + [1]*count + ...`` matching the class-major layout."""
    return torch.arange(way, device=device).repeat_interleave(count)
