"""Base-query sampling, per-episode reduction of joint scores, metrics and the seen-unseen curve."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ...errors import ConfigError, DataError
from ..episodes import _check_int, as_label_tensor
from ..finetune import _mix


# ----------------------------------------------------------------------------- sampling

def sample_base_queries(labels: Any, count: int, episodes: int, seed: int = 0, *,
                        class_names: Sequence[str] | None = None) -> Tensor:
    """Indices ``[episodes, count]`` of held-out base images, spread evenly over the classes.

    Per episode the classes are taken in a random order, cycling: every class gets
    ``count // C`` or ``count // C + 1`` queries (a random subset gets the extra one), and the
    images of a class are distinct. Refuses when a class has fewer than ``ceil(count / C)``
    images. Reproducible in ``seed`` (its own generator, independent of the novel episodes).
    """
    count = _check_int("base_query", count, 1)
    episodes = _check_int("episodes", episodes, 1)
    y = as_label_tensor(labels)
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    k = classes.numel()
    need = -(-count // k)
    short = (counts < need).nonzero().flatten().tolist()
    if short:
        c = int(classes[short[0]])
        name = f" ({class_names[c]!r})" if class_names is not None and 0 <= c < len(class_names) else ""
        raise DataError(f"base class {c}{name} has {int(counts[short[0]])} held-out images, fewer than the "
                        f"{need} that {count} base queries over {k} classes need")
    gen = torch.Generator().manual_seed(_mix(seed, 1 << 40))
    order = torch.argsort(inverse, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    max_count = int(counts.max())
    slot = torch.arange(count)
    out = torch.empty(episodes, count, dtype=torch.int64)
    step = max(1, (1 << 22) // (k * max_count))
    ar = torch.arange(max_count)
    for s in range(0, episodes, step):
        e = min(step, episodes - s)
        perm = torch.rand(e, k, generator=gen, dtype=torch.float64).argsort(1)       # class order
        keys = torch.rand(e, k, max_count, generator=gen, dtype=torch.float64)
        keys.masked_fill_(ar >= counts.view(1, k, 1), 2.0)
        ranks = keys.topk(need, dim=-1, largest=False, sorted=True).indices        # [e, k, need]
        cls = perm[:, slot % k]                                                     # [e, count]
        r = ranks.gather(1, cls.unsqueeze(-1).expand(-1, -1, need))                 # [e, count, need]
        r = r.gather(2, (slot // k).view(1, count, 1).expand(e, -1, 1)).squeeze(-1)
        out[s:s + e] = order[offsets[cls] + r]
    return out


def split_heldout(labels: Any, val_fraction: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per-class seeded split of held-out base images into ``(val_idx, test_idx)``.

    ``floor(n * val_fraction)`` images of each class (at least 1, at most n - 1) go to
    validation: calibration never sees a base image of the test episodes.
    """
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise ConfigError(f"base_val_fraction must lie in (0, 1), got {val_fraction!r}")
    y = as_label_tensor(labels)
    gen = torch.Generator().manual_seed(_mix(seed, 1 << 41))
    keys = torch.rand(y.numel(), generator=gen, dtype=torch.float64)
    order = torch.argsort(keys)
    order = order[torch.argsort(y[order], stable=True)]     # grouped by class, random within
    classes, counts = torch.unique(y, return_counts=True)
    if bool((counts < 2).any()):
        c = int(classes[(counts < 2).nonzero()[0]])
        raise DataError(f"base class {c} has {int(counts.min())} held-out image; splitting into "
                        f"validation and test needs 2")
    n_val = (counts.double() * val_fraction).floor().long().clamp(1, None)
    n_val = torch.minimum(n_val, counts - 1)
    rank = torch.arange(y.numel()) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    is_val = rank < n_val.repeat_interleave(counts)
    return order[is_val].sort().values, order[~is_val].sort().values


# ----------------------------------------------------------------------------- per-episode reduction

class Reduced(NamedTuple):
    """Per query ``[E, Q]``: best base score, whether its class is right, same for novel.

    Everything the metrics need for any decision ``base if s_b * mb - gamma >= s_n * mn``.
    ``ok_base`` is False for novel queries and ``ok_novel`` False for base queries.
    """

    mb: Tensor
    ok_base: Tensor
    mn: Tensor
    ok_novel: Tensor

    def cat(self, other: Reduced) -> Reduced:
        return Reduced(*(torch.cat([a, b]) for a, b in zip(self, other)))


def reduce_scores(base_scores: Tensor, novel_scores: Tensor, labels: Tensor, num_base: int) -> Reduced:
    """From joint scores split as ``[E, Q, C]`` and ``[E, Q, way]`` and joint labels ``[E, Q]``."""
    mb, ab = base_scores.max(-1)
    mn, an = novel_scores.max(-1)
    is_base = labels < num_base
    return Reduced(mb, (ab == labels) & is_base, mn, (an + num_base == labels) & ~is_base)


def episode_metrics(red: Reduced, is_base: Tensor, gamma: float | Tensor = 0.0,
                    scale_base: float = 1.0, scale_novel: float = 1.0) -> dict[str, Tensor]:
    """Per-episode metrics (percent, ``[E]``) for the decision ``s_b * mb - gamma >= s_n * mn``.

    ``is_base`` ``[Q]`` or ``[E, Q]`` marks base queries. ``ausuc`` uses the exact area under the
    staircase traced by gamma (pairs of right base and right novel queries ordered by the margin
    ``d = s_b * mb - s_n * mn``; ties count half), independent of ``gamma``.
    """
    is_base = is_base.expand_as(red.mb)
    d = scale_base * red.mb.double() - scale_novel * red.mn.double()
    base_pred = d >= gamma
    nb = is_base.sum(1).double()
    nn_ = (~is_base).sum(1).double()
    if bool((nb == 0).any()) or bool((nn_ == 0).any()):
        raise DataError("every episode needs base and novel queries")
    cb = (red.ok_base & base_pred).sum(1).double()
    cn = (red.ok_novel & ~base_pred).sum(1).double()
    base, novel = 100 * cb / nb, 100 * cn / nn_
    joint = 100 * (cb + cn) / (nb + nn_)
    hmean = torch.where(base + novel > 0, 2 * base * novel / (base + novel).clamp_min(1e-300),
                        torch.zeros_like(base))
    base_only = 100 * red.ok_base.sum(1).double() / nb
    novel_only = 100 * red.ok_novel.sum(1).double() / nn_
    delta = ((base_only - base) + (novel_only - novel)) / 2
    return {"base": base, "novel": novel, "joint": joint, "hmean": hmean, "delta": delta,
            "ausuc": _ausuc(d, red.ok_base, red.ok_novel, nb, nn_),
            "base_only": base_only, "novel_only": novel_only}


def _ausuc(d: Tensor, ok_base: Tensor, ok_novel: Tensor, nb: Tensor, nn_: Tensor) -> Tensor:
    """100 * sum over right base i, right novel j of [d_i > d_j] + [d_i = d_j] / 2, / (nb nn)."""
    out = torch.empty(d.shape[0], dtype=torch.float64, device=d.device)
    q = d.shape[1]
    step = max(1, (1 << 24) // (q * q))
    for s in range(0, d.shape[0], step):
        dd = d[s:s + step]
        gt = (dd.unsqueeze(2) > dd.unsqueeze(1)).double() + 0.5 * (dd.unsqueeze(2) == dd.unsqueeze(1)).double()
        w = ok_base[s:s + step].double().unsqueeze(2) * ok_novel[s:s + step].double().unsqueeze(1)
        out[s:s + step] = (gt * w).sum((1, 2))
    return 100 * out / (nb * nn_)


def _accuracy_at(red: Reduced, is_base: Tensor, gammas: Tensor, scale_base: float = 1.0,
                 scale_novel: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-episode base and novel accuracy (percent) at each gamma: two ``[G, E]`` tensors."""
    is_base = is_base.expand_as(red.mb)
    d = scale_base * red.mb.double() - scale_novel * red.mn.double()
    nb = is_base.sum(1).double()
    nn_ = (~is_base).sum(1).double()
    base, novel = [], []
    for g in gammas.double().split(16):
        pred = d.unsqueeze(0) >= g.view(-1, 1, 1)                                  # [g, E, Q]
        base.append(100 * (red.ok_base & pred).sum(2).double() / nb)
        novel.append(100 * (red.ok_novel & ~pred).sum(2).double() / nn_)
    return torch.cat(base), torch.cat(novel)


def seen_unseen_curve(red: Reduced, is_base: Tensor, gammas: Tensor, scale_base: float = 1.0,
                      scale_novel: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mean (over episodes) base and novel accuracy at each gamma: two ``[G]`` tensors (percent)."""
    base, novel = _accuracy_at(red, is_base, gammas, scale_base, scale_novel)
    return base.mean(1), novel.mean(1)


def criterion_at(red: Reduced, is_base: Tensor, gammas: Tensor, criterion: str = "hmean") -> Tensor:
    """Mean over episodes of the per-episode ``hmean`` (or ``joint`` accuracy) at each gamma: ``[G]``."""
    base, novel = _accuracy_at(red, is_base, gammas)
    if criterion == "joint":
        nb = is_base.expand_as(red.mb).sum(1).double()
        nq = float(red.mb.shape[1])
        return ((base * nb + novel * (nq - nb)) / nq).mean(1)
    h = torch.where(base + novel > 0, 2 * base * novel / (base + novel).clamp_min(1e-300), torch.zeros_like(base))
    return h.mean(1)


def _gamma_grid(d: Tensor, points: int) -> Tensor:
    """Quantiles of the pooled margins, plus 0 (no calibration), sorted by |gamma|."""
    flat = d.flatten().double()
    if flat.numel() > 1 << 20:
        flat = flat[torch.linspace(0, flat.numel() - 1, 1 << 20).long()]
    q = torch.quantile(flat, torch.linspace(0, 1, points, dtype=torch.float64))
    grid = torch.unique(torch.cat([q, q + 1e-9 * q.abs().clamp_min(1), torch.zeros(1, dtype=torch.float64)]))
    return grid[torch.argsort(grid.abs(), stable=True)]
