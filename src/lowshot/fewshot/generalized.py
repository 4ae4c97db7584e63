"""Generalized few-shot: base and novel classes scored together, with decoupled calibration.

Protocol (Gidaris & Komodakis, CVPR 2018; Ye et al., IJCV 2021, "Learning Adaptive Classifiers
Synthesis for Generalized Few-Shot Learning"; the seen-unseen curve of Chao et al., ECCV 2016):

* The trained head is the base classifier (``C`` rows). Each episode (``sample_episodes`` on the
  novel split) adds ``way`` novel classes with ``shot`` supports. Queries: ``query`` per novel
  class AND ``base_query`` held-out base images (default ``way * query``, i.e. as many base as
  novel queries), spread as evenly as possible over the base classes (``sample_base_queries``).
* Joint label space: all ``C`` base classes + the episode's ``way`` novel classes.
* Novel rows from the support (``method``): ``imprint`` = normalised mean of the normalised
  support features (Qi et al., CVPR 2018), the default for cosine-family heads; ``finetune`` =
  imprinted init, then the Negative-Margin fine-tune schedule (``FinetuneConfig``: SGD lr 0.01,
  momentum 0.9, dampening 0.9, wd 1e-3, batches of 4, 150 / 600 steps) on the novel rows only,
  cross-entropy in the joint space, base rows frozen (the default for linear-family heads);
  ``ncm`` = nearest class mean over the base-class means (from base training features) plus the
  support means (cosine on centred, L2-normalised features, as ``heads.ncm``).
* Calibration (fitted on validation episodes built from the ``val`` classes and a validation
  part of the held-out base images, never from the test episodes):
  ``none``; ``tau_norm`` = ``w / |w|^tau`` on every row of the joint weight matrix, biases
  dropped (Kang et al. 2020, ``longtail.tau_normalize``), tau from ``DEFAULT_TAU_GRID``;
  ``scale`` = LWS-style, one scale for the base scores and one for the novel scores, learned by
  class-group-balanced cross-entropy on the validation queries; ``bias`` = calibrated stacking
  (Chao et al.): a constant ``gamma`` subtracted from every base score.
  Selection criterion (tau, gamma): mean per-episode harmonic mean on validation (``criterion``).
  For cosine heads, imprinting and cosine NCM every row has unit norm, so ``tau_norm`` equals
  ``none`` there (reported, not hidden).
* Metrics per episode, then mean and 95 % CI (``api.summarize``): ``base`` / ``novel`` (accuracy
  of the base / novel queries in the joint space), ``joint`` (all queries), ``hmean`` (harmonic
  mean of base and novel), ``delta`` (mean drop from the separate setting:
  ``((base_only - base) + (novel_only - novel)) / 2``, where ``base_only`` / ``novel_only`` are
  the accuracies with the argmax restricted to the base / the novel classes), and ``ausuc`` (area
  under the novel-vs-base accuracy curve traced by sweeping gamma from -inf to +inf, in % of
  the unit square). All in percent.

Batched: episodes are processed in chunks (``chunk_size``) with one tensor op per step; no
Python loop over episodes. Ties between the best base and best novel score go to the base
class (``argmax`` over ``[base, novel]`` takes the first maximum); AUSUC counts them half.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from .api import as_feature_tensor, summarize
from .episodes import _check_int, as_label_tensor, sample_episodes
from .finetune import FinetuneConfig, _mix, episode_draws

CALIBRATIONS = ("none", "tau_norm", "scale", "bias")
METHODS = ("auto", "imprint", "finetune", "ncm")
KINDS = ("cosine", "linear", "ncm")
METRICS = ("base", "novel", "joint", "hmean", "delta", "ausuc", "base_only", "novel_only")
CRITERIA = ("hmean", "joint")
CURVE_POINTS = 64


# ----------------------------------------------------------------------------- the base classifier

@dataclass(frozen=True)
class BaseClassifier:
    """The base classifier in linear form: ``score_j = scale * (phi(x) . w_j + b_j)``.

    ``kind="cosine"``: phi(x) = x / |x|, rows normalised (cosine / arcface heads);
    ``kind="linear"``: phi(x) = x, raw rows and bias (linear / neg_softmax / virtual_softmax);
    ``kind="ncm"``: phi(x) = normalize(x - center), rows = class means of phi over the base
    training images, cosine metric (rows normalised) or ``metric="l2"`` (``2 mu`` and bias
    ``-|mu|^2``, i.e. ``-|phi(x) - mu|^2`` up to a constant per query).
    """

    weight: Tensor
    kind: str = "cosine"
    scale: float = 1.0
    bias: Tensor | None = None
    center: Tensor | None = None
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"base classifier kind must be one of {KINDS}, got {self.kind!r}")
        w = torch.as_tensor(self.weight)
        if w.dim() != 2 or w.shape[0] < 1:
            raise DataError(f"base classifier weight must be [classes, dims], got shape {tuple(w.shape)}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"base classifier scale must be a finite number > 0, got {self.scale!r}")
        if self.bias is not None and torch.as_tensor(self.bias).shape != (w.shape[0],):
            raise DataError(f"base classifier bias must have {w.shape[0]} values, got {tuple(self.bias.shape)}")
        if self.kind == "ncm" and self.metric not in ("cosine", "l2"):
            raise ConfigError(f"ncm metric must be 'cosine' or 'l2', got {self.metric!r}")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_head(cls, head: torch.nn.Module) -> BaseClassifier:
        """The trained head of a checkpoint as a base classifier (margins are training-only)."""
        from ..heads import ArcFaceHead, CosineHead, LinearHead, NegSoftmaxHead, VirtualSoftmaxHead
        from ..heads.ncm import NCMHead
        w = head.weight.detach().float().cpu()
        if isinstance(head, (CosineHead, ArcFaceHead)):
            return cls(w, "cosine", float(head.scale))
        if isinstance(head, NegSoftmaxHead):
            b = None if head.bias is None else head.bias.detach().float().cpu()
            return cls(w, "linear", float(head.scale), b)
        if isinstance(head, LinearHead):
            b = None if head.bias is None else head.bias.detach().float().cpu()
            return cls(w, "linear", 1.0, b)
        if isinstance(head, VirtualSoftmaxHead):
            return cls(w, "linear", 1.0)   # eval-mode logits are W x
        if isinstance(head, NCMHead):
            return cls(w, "ncm", 1.0, center=head.center.detach().float().cpu(), metric=head.metric)
        raise ConfigError(f"generalized few-shot has no rule for head {type(head).__name__}; "
                          f"use method=ncm with base training features")

    @classmethod
    def ncm(cls, features: Any, labels: Any, metric: str = "cosine") -> BaseClassifier:
        """NCM over base training features (``heads.ncm.NCMHead.fit``: centre = mean class mean)."""
        from ..heads.ncm import NCMHead
        x = as_feature_tensor(features)
        y = as_label_tensor(labels)
        if y.numel() != x.shape[0]:
            raise DataError(f"{x.shape[0]} base training feature rows but {y.numel()} labels")
        head = NCMHead(int(y.max()) + 1, x.shape[1], metric).to(x.dtype).fit(x, y)
        return cls(head.weight.detach(), "ncm", 1.0, center=head.center.detach(), metric=metric)

    def project(self, x: Tensor) -> Tensor:
        """phi(x): the features the rows are dotted with."""
        if self.kind == "cosine":
            return F.normalize(x, dim=-1)
        if self.kind == "ncm":
            return F.normalize(x - self.center.to(x), dim=-1)
        return x

    def rows(self, dtype: torch.dtype, device: Any) -> tuple[Tensor, Tensor]:
        """``(W [C, D], b [C])`` of the linear form."""
        w = self.weight.to(device, dtype)
        zeros = torch.zeros(w.shape[0], dtype=dtype, device=device)
        if self.kind == "cosine" or (self.kind == "ncm" and self.metric == "cosine"):
            return F.normalize(w, dim=1), zeros
        if self.kind == "ncm":
            return 2 * w, -w.square().sum(1)
        return w, (zeros if self.bias is None else self.bias.to(device, dtype))


def _method_for(clf: BaseClassifier, method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"generalized method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return {"cosine": "imprint", "linear": "finetune", "ncm": "ncm"}[clf.kind]
    if (method == "ncm") != (clf.kind == "ncm"):
        raise ConfigError(f"method {method!r} does not fit a {clf.kind!r} base classifier "
                          f"(ncm needs the NCM base classifier over base training features)")
    return method


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


# ----------------------------------------------------------------------------- novel weights

def _imprint(clf: BaseClassifier, support: Tensor, base_w: Tensor, base_b: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised mean of the normalised support; linear kind: at the mean base-row norm and bias."""
    mean = F.normalize(F.normalize(support, dim=-1).mean(2), dim=-1)                 # [e, way, D]
    if clf.kind == "linear":
        return mean * base_w.norm(dim=1).mean(), base_b.mean().expand(mean.shape[:2]).clone()
    return mean, torch.zeros(mean.shape[:2], dtype=mean.dtype, device=mean.device)


def _ncm_rows(clf: BaseClassifier, support: Tensor) -> tuple[Tensor, Tensor]:
    """Support means of phi(x) (already projected) in the NCM base classifier's form."""
    mu = support.mean(2)
    if clf.metric == "cosine":
        return F.normalize(mu, dim=-1), torch.zeros(mu.shape[:2], dtype=mu.dtype, device=mu.device)
    return 2 * mu, -mu.square().sum(-1)


def finetune_novel_rows(cfg: FinetuneConfig, clf: BaseClassifier, base_w: Tensor, base_b: Tensor,
                        support: Tensor, w0: Tensor, b0: Tensor, perms: Tensor, shot: int) -> tuple[Tensor, Tensor]:
    """Fine-tune only the novel rows ``w0`` [e, way, D] (and biases, linear kind) in the joint space.

    ``support`` [e, way * shot, D] holds projected features in class-major order. Every episode
    runs ``cfg``'s schedule with its own support order (``perms`` [e, passes, n] from
    ``finetune.episode_draws``): mini-batches of ``cfg.batch_size``, mean cross-entropy over the
    C + way joint classes with the base rows frozen. The update is ``torch.optim.SGD``'s
    (``g = grad + wd p``; ``buf = g`` first, then ``mom buf + (1 - damp) g``; ``p -= lr buf``),
    written out because it is elementwise: one tensor holding all episodes equals one optimizer
    per episode (and torch.optim's first use imports torch._dynamo, seconds on a busy CPU).
    """
    e, n, _ = support.shape
    way = w0.shape[1]
    num_base = base_w.shape[0]
    steps = cfg.num_steps(n, shot)
    per_pass = math.ceil(n / cfg.batch_size)
    cosine = clf.kind == "cosine"
    lr, mom, damp, wd = float(cfg.lr), float(cfg.momentum), float(cfg.dampening), float(cfg.weight_decay)
    params = [w0.clone().requires_grad_(True)] + ([] if cosine else [b0.clone().requires_grad_(True)])
    bufs: list[Tensor | None] = [None] * len(params)
    labels = torch.arange(way, device=support.device).repeat_interleave(shot) + num_base
    scale = float(clf.scale)
    for t in range(steps):
        p, j = divmod(t, per_pass)
        idx = perms[:, p, j * cfg.batch_size:(j + 1) * cfg.batch_size].to(support.device, torch.int64)
        xb = support.gather(1, idx.unsqueeze(-1).expand(-1, -1, support.shape[2]))   # [e, b, D]
        yb = labels[idx]                                                              # [e, b]
        base_logits = xb @ base_w.t() + base_b
        w = params[0]
        if cosine:
            novel_logits = torch.bmm(xb, F.normalize(w, dim=-1).transpose(1, 2))
        else:
            novel_logits = torch.bmm(xb, w.transpose(1, 2)) + params[1].unsqueeze(1)
        logits = scale * torch.cat([base_logits, novel_logits], -1)
        loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(e, -1).mean(1).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (prm, g) in enumerate(zip(params, grads)):
                g = g.add(prm, alpha=wd) if wd else g
                if mom:
                    bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(mom).add_(g, alpha=1 - damp)
                    g = bufs[i]
                prm.sub_(g, alpha=lr)
    w = params[0].detach()
    b = b0.clone() if cosine else params[1].detach()
    return (F.normalize(w, dim=-1) if cosine else w), b


# ----------------------------------------------------------------------------- scoring one split

@dataclass
class _Split:
    """One evaluation split: novel images, held-out base images, their episodes."""

    novel: Tensor          # [Nn, D] raw features
    base: Tensor           # [Nb, D]
    base_labels: Tensor    # [Nb]
    episodes: Tensor       # [E, way, shot + query] indices into novel
    base_idx: Tensor       # [E, base_query] indices into base


class _Scorer:
    """Scores the queries of a split's episodes, chunk by chunk, for several weight variants."""

    def __init__(self, clf: BaseClassifier, method: str, shot: int, seed: int, cfg: FinetuneConfig,
                 chunk_size: int, dtype: torch.dtype, device: Any) -> None:
        self.clf, self.method, self.shot, self.seed, self.cfg = clf, method, shot, seed, cfg
        self.chunk, self.dtype, self.device = chunk_size, dtype, device
        self.base_w, self.base_b = clf.rows(dtype, device)

    def novel_rows(self, sup: Tensor, start: int) -> tuple[Tensor, Tensor]:
        e, way, shot, dim = sup.shape
        if self.method == "ncm":
            return _ncm_rows(self.clf, sup)
        w, b = _imprint(self.clf, sup, self.base_w, self.base_b)
        if self.method == "imprint":
            return w, b
        n = way * shot
        steps = self.cfg.num_steps(n, shot)
        passes = max(1, math.ceil(steps / math.ceil(n / self.cfg.batch_size)))
        perms = episode_draws(self.seed, start, start + e, way, dim, n, passes).perms
        with torch.enable_grad():
            return finetune_novel_rows(self.cfg, self.clf, self.base_w, self.base_b, sup.reshape(e, n, dim),
                                       w, b, perms, shot)

    def run(self, split: _Split, taus: Sequence[float | None], keep_full: bool = False
            ) -> tuple[dict[float | None, Reduced], Tensor | None, Tensor]:
        """Reduced scores per tau (None = untouched weights); optionally the full untouched scores."""
        clf, shot = self.clf, self.shot
        pn = clf.project(split.novel.to(self.device, self.dtype))
        pb = clf.project(split.base.to(self.device, self.dtype))
        num_base = clf.num_classes
        e_total, way, m = split.episodes.shape
        from ..longtail.decouple import tau_normalize   # the long-tail tau-norm, reused (lazy: no cycle)
        base_rows = {}
        for tau in taus:   # base-row scores of every image once per variant: [Nn + Nb, C]
            w, bias = (self.base_w, self.base_b) if tau is None else (
                tau_normalize(self.base_w, tau), torch.zeros_like(self.base_b))
            base_rows[tau] = torch.cat([pn, pb]) @ w.t() + bias
        pool = torch.cat([pn, pb])
        out: dict[float | None, list[Reduced]] = {t: [] for t in taus}
        full = []
        for s in range(0, e_total, self.chunk):
            eps = split.episodes[s:s + self.chunk].to(self.device)
            bidx = split.base_idx[s:s + self.chunk].to(self.device)
            e = eps.shape[0]
            sup = pn[eps[:, :, :shot]]                                                  # [e, way, shot, D]
            w_nov, b_nov = self.novel_rows(sup, s)
            q_idx = torch.cat([eps[:, :, shot:].reshape(e, -1), bidx + pn.shape[0]], 1)  # into [pn; pb]
            qx = pool[q_idx]                                              # [e, Q, D]
            labels = torch.cat([
                (torch.arange(way, device=self.device).repeat_interleave(m - shot) + num_base).expand(e, -1),
                split.base_labels.to(self.device)[bidx]], 1)
            for tau in taus:
                scores_all = base_rows[tau]
                if tau is None:
                    wn, bn = w_nov, b_nov
                else:
                    wn = tau_normalize(w_nov.reshape(-1, w_nov.shape[-1]), tau).view_as(w_nov)
                    bn = torch.zeros_like(b_nov)
                base_s = clf.scale * scores_all[q_idx]                                     # [e, Q, C]
                novel_s = clf.scale * (torch.bmm(qx, wn.transpose(1, 2)) + bn.unsqueeze(1))
                out[tau].append(reduce_scores(base_s, novel_s, labels, num_base))
                if keep_full and tau is None:
                    full.append((torch.cat([base_s, novel_s], -1).float(), labels))
        red = {t: Reduced(*(torch.cat(parts) for parts in zip(*v))) for t, v in out.items()}
        full_t = None
        if keep_full:
            full_t = (torch.cat([f for f, _ in full]), torch.cat([lab for _, lab in full]))
        nq = way * (m - shot)
        is_base = torch.arange(nq + split.base_idx.shape[1], device=self.device) >= nq
        return red, full_t, is_base


def fit_group_scales(scores: Tensor, labels: Tensor, num_base: int, iters: int = 50) -> tuple[float, float]:
    """LWS-style: ``(s_base, s_novel)`` minimising group-balanced CE of the joint scores.

    ``scores`` [E, Q, C + way], ``labels`` [E, Q] joint; base and novel queries weigh half each
    (the class-balanced sampling of LWS, at the level of the two groups). L-BFGS on log-scales.
    """
    flat = scores.reshape(-1, scores.shape[-1]).double()
    y = labels.reshape(-1)
    is_base = y < num_base
    wts = torch.where(is_base, 0.5 / is_base.sum().clamp_min(1), 0.5 / (~is_base).sum().clamp_min(1)).double()
    col_novel = torch.arange(flat.shape[1], device=flat.device) >= num_base

    def loss_of(log_s: Tensor) -> Tensor:
        s = torch.where(col_novel, log_s[1].exp(), log_s[0].exp())
        return (F.cross_entropy(flat * s, y, reduction="none") * wts).sum()

    # Damped Newton on the two log-scales (the loss is smooth and 2-D: a few steps converge).
    log_s = torch.zeros(2, dtype=torch.float64, device=flat.device)
    with torch.enable_grad():
        for _ in range(iters):
            x = log_s.clone().requires_grad_(True)
            loss = loss_of(x)
            g, = torch.autograd.grad(loss, x, create_graph=True)
            h = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(2)])
            g, h = g.detach(), h.detach()
            step = -torch.linalg.solve(h + 1e-9 * torch.eye(2, dtype=h.dtype, device=h.device), g)
            if not bool(torch.isfinite(step).all()) or float(g @ step) >= 0:
                step = -g                                     # not a descent direction: gradient step
            t, base = 1.0, float(loss.detach())
            while t > 1e-8 and float(loss_of(log_s + t * step)) > base + 1e-4 * t * float(g @ step):
                t *= 0.5
            log_s = (log_s + t * step).clamp(-20, 20)
            if float(g.norm()) < 1e-10 or t * float(step.norm()) < 1e-12:
                break
    s = log_s.exp()
    return float(s[0]), float(s[1])


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Stat:
    mean: float
    ci95: float


@dataclass
class GeneralizedResult:
    """One (shot, calibration) cell. ``chosen``: the fitted parameters (tau / gamma / scales)."""

    shot: int
    calibration: str
    base: Stat
    novel: Stat
    joint: Stat
    hmean: Stat
    delta: Stat
    ausuc: Stat
    base_only: Stat
    novel_only: Stat
    chosen: dict[str, float]
    val_criterion: float | None
    curve: dict[str, list[float]]          # gamma, base, novel (means over test episodes)
    per_episode: dict[str, list[float]] = field(repr=False, default_factory=dict)


@dataclass
class GeneralizedReport:
    """What ``evaluate_generalized`` returns and ``lowshot eval --generalized`` writes as JSON."""

    way: int
    query: int
    base_query: int
    episodes: int
    val_episodes: int
    seed: int
    method: str
    classifier: str                    # base classifier kind: cosine / linear / ncm
    num_base_classes: int
    criterion: str
    results: list[GeneralizedResult]
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "generalized", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneralizedReport:
        """Strict reader: a missing key is a DataError naming it."""
        try:
            if d["kind"] != "generalized":
                raise DataError(f"not a generalized few-shot result (kind={d['kind']!r})")
            results = [GeneralizedResult(
                shot=int(r["shot"]), calibration=str(r["calibration"]),
                **{k: Stat(float(r[k]["mean"]), float(r[k]["ci95"])) for k in METRICS},
                chosen=dict(r["chosen"]), val_criterion=r["val_criterion"], curve=dict(r["curve"]),
                per_episode=dict(r["per_episode"])) for r in d["results"]]
            return cls(way=int(d["way"]), query=int(d["query"]), base_query=int(d["base_query"]),
                       episodes=int(d["episodes"]), val_episodes=int(d["val_episodes"]), seed=int(d["seed"]),
                       method=str(d["method"]), classifier=str(d["classifier"]),
                       num_base_classes=int(d["num_base_classes"]), criterion=str(d["criterion"]),
                       results=results, source=dict(d["source"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"generalized result lacks key {e}") from None


def format_generalized_table(report: GeneralizedReport, digits: int = 2) -> str:
    """Markdown table: one row per shot x calibration, ``mean ± ci95`` per metric."""
    head = ("| shot | calibration | base | novel | joint | hmean | delta | AUSUC | base only | novel only "
            "| chosen on val |")
    rule = "|" + "---|" * 11
    rows = []
    for r in report.results:
        cells = [f"{getattr(r, k).mean:.{digits}f} ± {getattr(r, k).ci95:.{digits}f}" for k in METRICS]
        chosen = ", ".join(f"{k}={v:.4g}" for k, v in r.chosen.items()) or "-"
        rows.append(f"| {r.shot} | {r.calibration} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join([head, rule, *rows])


# ----------------------------------------------------------------------------- the evaluator

def _stats(per_ep: dict[str, Tensor]) -> dict[str, Stat]:
    out = {}
    for k in METRICS:
        mean, _, ci = summarize(per_ep[k].cpu().numpy())
        out[k] = Stat(mean, ci)
    return out


def _labels_in_range(labels: Tensor, num_base: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_base):
        raise DataError(f"{what} labels must index the {num_base} base classes, got range "
                        f"{int(labels.min())}..{int(labels.max())}")


def evaluate_generalized(base_features: Any, base_labels: Any, novel_features: Any, novel_labels: Any, *,
                         base_classifier: BaseClassifier | None = None,
                         base_train_features: Any = None, base_train_labels: Any = None,
                         val_features: Any = None, val_labels: Any = None,
                         base_val_features: Any = None, base_val_labels: Any = None,
                         way: int = 5, shots: Sequence[int] = (1, 5), query: int = 15,
                         base_query: int | None = None, episodes: int = 600, val_episodes: int | None = None,
                         calibrations: Sequence[str] = ("none",), method: str = "auto",
                         criterion: str = "hmean", seed: int = 0, chunk_size: int = 64,
                         finetune: dict[str, Any] | None = None, tau_grid: Sequence[float] | None = None,
                         ncm_metric: str = "cosine", device: Any = None,
                         source: dict[str, Any] | None = None) -> GeneralizedReport:
    """Generalized few-shot evaluation on feature arrays (see the module docstring).

    ``base_features`` / ``base_labels``: held-out base images for the test episodes' base queries
    (labels index the base classifier's rows). ``novel_*``: the novel split. ``base_classifier``:
    e.g. ``BaseClassifier.from_head(model.head)``; when None (or ``method="ncm"``) it is the NCM
    over ``base_train_features`` / ``base_train_labels``. Calibrations other than ``none`` need
    validation episodes: ``val_*`` (the val classes) and ``base_val_*`` (held-out base images
    disjoint from ``base_features``, e.g. from ``split_heldout``). ``base_query`` defaults to
    ``way * query``; ``val_episodes`` to ``episodes``. ``finetune``: ``FinetuneConfig`` fields.
    """
    unknown = [c for c in calibrations if c not in CALIBRATIONS]
    if unknown or not calibrations:
        raise ConfigError(f"calibration must be among {CALIBRATIONS}, got {list(calibrations)!r}")
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    way = _check_int("way", way, 1)
    query = _check_int("query", query, 1)
    episodes = _check_int("episodes", episodes, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    base_query = way * query if base_query is None else _check_int("base_query", base_query, 1)
    val_episodes = episodes if val_episodes is None else _check_int("val_episodes", val_episodes, 1)
    if method not in METHODS:
        raise ConfigError(f"generalized method must be one of {METHODS}, got {method!r}")
    if base_classifier is None or (method == "ncm" and base_classifier.kind != "ncm"):
        if base_train_features is None or base_train_labels is None:
            raise ConfigError("no base classifier given: the NCM base classifier needs base_train_features "
                              "and base_train_labels")
        base_classifier = BaseClassifier.ncm(base_train_features, base_train_labels, ncm_metric)
    clf = base_classifier
    method = _method_for(clf, method)
    cfg = FinetuneConfig(head="cosine" if clf.kind == "cosine" else "linear", **(finetune or {}))

    xb = as_feature_tensor(base_features, device)
    dtype, dev = xb.dtype, xb.device
    xn = as_feature_tensor(novel_features, dev).to(dtype)
    yb, yn = as_label_tensor(base_labels), as_label_tensor(novel_labels)
    for x, y, what in ((xb, yb, "base"), (xn, yn, "novel")):
        if x.shape[0] != y.numel():
            raise DataError(f"{what}: {x.shape[0]} feature rows but {y.numel()} labels")
        if x.shape[1] != clf.weight.shape[1]:
            raise DataError(f"{what} features have {x.shape[1]} dims, the base classifier {clf.weight.shape[1]}")
    _labels_in_range(yb, clf.num_classes, "held-out base")
    clf = BaseClassifier(clf.weight.to(dev, dtype), clf.kind, clf.scale,
                         None if clf.bias is None else clf.bias.to(dev, dtype),
                         None if clf.center is None else clf.center.to(dev, dtype), clf.metric)

    need_val = [c for c in calibrations if c != "none"]
    if need_val and any(v is None for v in (val_features, val_labels, base_val_features, base_val_labels)):
        raise ConfigError(f"calibration {need_val[0]!r} is fitted on validation episodes: give val_features, "
                          f"val_labels (val classes) and base_val_features, base_val_labels (held-out base "
                          f"images not used by the test episodes)")
    if need_val:
        xv, yv = as_feature_tensor(val_features, dev).to(dtype), as_label_tensor(val_labels)
        xbv, ybv = as_feature_tensor(base_val_features, dev).to(dtype), as_label_tensor(base_val_labels)
        if xv.shape[0] != yv.numel() or xbv.shape[0] != ybv.numel():
            raise DataError("validation features and labels differ in length")
        _labels_in_range(ybv, clf.num_classes, "validation base")
    from ..longtail.decouple import DEFAULT_TAU_GRID
    taus = sorted(float(t) for t in (DEFAULT_TAU_GRID if tau_grid is None else tau_grid))
    if "tau_norm" in calibrations and not taus:
        raise ConfigError("tau_norm: empty tau grid")

    results: list[GeneralizedResult] = []
    for shot in shots:
        shot = _check_int("shot", shot, 1)
        scorer = _Scorer(clf, method, shot, seed, cfg, chunk_size, dtype, dev)
        chosen: dict[str, dict[str, float]] = {"none": {}}
        val_crit: dict[str, float | None] = {"none": None}
        if need_val:
            vsplit = _Split(xv, xbv, ybv, sample_episodes(yv, way, shot, query, val_episodes, seed + 1),
                            sample_base_queries(ybv, base_query, val_episodes, seed + 1))
            vtaus: list[float | None] = [None] + (taus if "tau_norm" in calibrations else [])
            vred, vfull, vis_base = scorer.run(vsplit, vtaus, keep_full="scale" in calibrations)
            if "tau_norm" in calibrations:
                zero = torch.zeros(1, dtype=torch.float64, device=dev)
                crit = [float(criterion_at(vred[t], vis_base, zero, criterion)[0]) for t in taus]
                best = int(np.argmax(crit))               # first maximum: the smallest tau wins ties
                chosen["tau_norm"], val_crit["tau_norm"] = {"tau": taus[best]}, crit[best]
            if "bias" in calibrations:
                r0 = vred[None]
                grid = _gamma_grid(r0.mb.double() - r0.mn.double(), 401)
                crit_g = criterion_at(r0, vis_base, grid, criterion).tolist()
                best = int(np.argmax(crit_g))             # first maximum in |gamma| order: smallest shift
                chosen["bias"], val_crit["bias"] = {"gamma": float(grid[best])}, crit_g[best]
            if "scale" in calibrations:
                assert vfull is not None
                sb, sn = fit_group_scales(vfull[0], vfull[1], clf.num_classes)
                chosen["scale"] = {"scale_base": sb, "scale_novel": sn}
                val_crit["scale"] = float(episode_metrics(vred[None], vis_base, scale_base=sb,
                                                          scale_novel=sn)[criterion].mean())
        tsplit = _Split(xn, xb, yb, sample_episodes(yn, way, shot, query, episodes, seed),
                        sample_base_queries(yb, base_query, episodes, seed))
        ttaus: list[float | None] = [None] + ([chosen["tau_norm"]["tau"]] if "tau_norm" in chosen else [])
        tred, _, is_base = scorer.run(tsplit, ttaus)
        for cal in calibrations:
            red = tred[chosen["tau_norm"]["tau"]] if cal == "tau_norm" else tred[None]
            kw = {"gamma": chosen["bias"]["gamma"]} if cal == "bias" else (
                {"scale_base": chosen["scale"]["scale_base"], "scale_novel": chosen["scale"]["scale_novel"]}
                if cal == "scale" else {})
            per_ep = episode_metrics(red, is_base, **kw)
            sb, sn = kw.get("scale_base", 1.0), kw.get("scale_novel", 1.0)
            grid = _gamma_grid(sb * red.mb.double() - sn * red.mn.double(), CURVE_POINTS).sort().values
            cb, cn = seen_unseen_curve(red, is_base, grid, sb, sn)
            stats = _stats(per_ep)
            results.append(GeneralizedResult(
                shot=shot, calibration=cal, **stats, chosen=chosen[cal], val_criterion=val_crit[cal],
                curve={"gamma": grid.tolist(), "base": cb.tolist(), "novel": cn.tolist()},
                per_episode={k: v.cpu().tolist() for k, v in per_ep.items()}))
    return GeneralizedReport(way=way, query=query, base_query=base_query, episodes=episodes,
                             val_episodes=val_episodes if need_val else 0, seed=seed, method=method,
                             classifier=clf.kind, num_base_classes=clf.num_classes, criterion=criterion,
                             results=results, source=dict(source or {}))


# ----------------------------------------------------------------------------- from a checkpoint

def run_generalized_eval(checkpoint: str | Path, *, way: int | None = None, shots: Sequence[int] | None = None,
                         query: int | None = None, base_query: int | None = None, episodes: int | None = None,
                         val_episodes: int | None = None, calibrations: Sequence[str] = ("none",),
                         method: str | None = None, seed: int | None = None, base_val_fraction: float = 0.5,
                         options: dict[str, Any] | None = None, device: str = "auto",
                         out: str | Path | None = None, log: Any = print) -> GeneralizedReport:
    """``lowshot eval --generalized``: a checkpoint's head as the base classifier, its splits as data.

    Splits from the checkpoint config: novel episodes from ``data.novel_split``, validation
    episodes from ``data.val_split``; the held-out base images (``data.test_split``, e.g.
    ``base_test``) are split per class (``split_heldout``, ``base_val_fraction``) into the base
    queries of the validation and of the test episodes; ``data.train_split`` (base training
    images) only for ``method=ncm``. Unset protocol values come from the config's ``eval``
    section. ``options``: ``criterion``, ``chunk_size``, ``ncm_metric`` and ``FinetuneConfig``
    fields (``steps``, ``lr``, ...). Writes the JSON atomically (default: next to the checkpoint).
    """
    from ..checkpoint import write_text_atomic
    from ..inference import FrozenRun
    run = FrozenRun.open(checkpoint, device=device)
    ckpt_path, model, cfg = run.path, run.model, run.config
    e, d = cfg.eval, cfg.data
    for key, split in (("data.novel_split", d.novel_split), ("data.test_split", d.test_split)):
        if not split:
            raise ConfigError(f"generalized eval needs {key} in the checkpoint's config (held-out base images "
                              f"and novel classes)")
    need_val = any(c != "none" for c in calibrations)
    if need_val and not d.val_split:
        raise ConfigError("calibration needs validation classes: the checkpoint's config has no data.val_split")
    opts = dict(options or {})
    kw = {k: opts.pop(k) for k in ("criterion", "chunk_size", "ncm_metric") if k in opts}
    method = method or "auto"
    dev = run.device

    def feats(split: str) -> tuple[Tensor, Tensor, list[str]]:
        x, y = run.features(split)
        log(f"features: {split} split, {x.shape[0]} images, {len(set(y.tolist()))} classes")
        return x, y, list(run.dataset(split).class_names)

    base_x, base_y, base_names = feats(d.test_split)
    val_idx, test_idx = split_heldout(base_y, base_val_fraction, 0)
    novel_x, novel_y, _ = feats(d.novel_split)
    arrays: dict[str, Any] = {}
    if need_val:
        vx, vy, _ = feats(d.val_split)
        arrays.update(val_features=vx, val_labels=vy, base_val_features=base_x[val_idx],
                      base_val_labels=base_y[val_idx])
    if method == "ncm":
        tx, ty, _ = feats(d.train_split)
        arrays.update(base_train_features=tx, base_train_labels=ty)
        clf = None
    else:
        clf = BaseClassifier.from_head(model.head)
    report = evaluate_generalized(
        base_x[test_idx], base_y[test_idx], novel_x, novel_y, base_classifier=clf,
        way=e.way if way is None else way, shots=list(e.shots if shots is None else shots),
        query=e.query if query is None else query, base_query=base_query,
        episodes=e.episodes if episodes is None else episodes, val_episodes=val_episodes, calibrations=list(calibrations),
        method=method, seed=e.seed if seed is None else seed, finetune=opts or None, device=dev,
        source={"checkpoint": str(ckpt_path), "dataset": d.name, "head": cfg.head.name,
                "margin": cfg.head.margin, "novel_split": d.novel_split, "val_split": d.val_split,
                "base_split": d.test_split, "base_val_fraction": base_val_fraction}, **arrays, **kw)
    log(format_generalized_table(report))
    out_path = Path(out) if out else ckpt_path.parent / f"generalized_{ckpt_path.stem}_{report.method}.json"
    write_text_atomic(out_path, json.dumps(report.to_dict(), indent=1))
    log(f"wrote {out_path}")
    return report
