"""Few-shot methods on frozen features, each solving all episodes of a chunk at once.

A method maps ``(features [N, D], episodes [E, way, shot + query], shot)`` to query scores
``[E, way * query, way]`` (queries in class-major order, so query ``i`` has label
``i // query``).  Methods register in ``EVALUATORS``; add one by subclassing
``FewShotMethod`` (typed ``__init__`` options) and decorating it with ``@register_evaluator("name")``;
``create_evaluator(name, **options)`` checks the options (``Registry.create``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from ..registry import Registry
from .basis import GATHER_BUDGET, gather_into, inverse_norms
from .finetune import FinetuneConfig, finetune_scores
from .logreg import logreg_scores
from .reference import finetune_reference

EVALUATORS: Registry = Registry("few-shot method")
_NCM_BLOCK = 1 << 20   # floats of gathered rows per NCM block


def register_evaluator(name: str | None = None, *aliases: str, **meta: Any) -> Callable[[Any], Any]:
    """Decorator: register a ``FewShotMethod`` subclass (its ``__init__`` options are checked)."""
    return EVALUATORS.register(name, *aliases, **meta)


def list_evaluators() -> list[str]:
    """Registered few-shot evaluator names (aliases excluded), sorted."""
    return EVALUATORS.names()


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class FewShotMethod:
    """Base class: chunks episodes (memory) and delegates each chunk to ``chunk_scores``."""

    name = "method"

    def __init__(self, chunk_size: int = 256) -> None:
        self.chunk_size = _positive_int("chunk_size", chunk_size)

    def scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int = 0) -> Tensor:
        """Query scores ``[E, way * query, way]``; identical for any ``chunk_size``."""
        from ..utils import progress
        starts = range(0, episodes.shape[0], self.chunk_size)  # a bar only if this takes over ~2 s
        parts = [self.chunk_scores(features, episodes[s:s + self.chunk_size], shot, seed, s)
                 for s in progress(starts, desc=f"{self.name} {episodes.shape[0]} episodes", enabled=len(starts) > 1)]
        return torch.cat(parts)

    def chunk_scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int,
                     start: int) -> Tensor:
        raise NotImplementedError


def create_evaluator(name: str, **options: Any) -> FewShotMethod:
    """Few-shot method ``name``; unknown or wrong-typed options raise ConfigError naming them."""
    return EVALUATORS.create(name, **options)


@register_evaluator("finetune")
class Finetune(FewShotMethod):
    """Fresh head per episode fine-tuned with SGD (Baseline++ / Negative-Margin protocol).

    See ``lowshot.fewshot.finetune`` for the exact protocol.  ``batched=False`` runs the
    per-episode reference loop (``torch.optim.SGD`` on an ``nn.Module``) with the same
    initial weights and shuffles; ``solve_dtype`` ("float32"/"float64", default: features'
    dtype) is the precision of the batched SGD in the small basis.
    """

    name = "finetune"

    def __init__(self, head: str = "cosine", preset: str = "mmfewshot", steps: int | None = None,
                 epochs: int | None = None, scale: float | None = None, bias: bool = True,
                 lr: float = 0.01, momentum: float = 0.9, dampening: float = 0.9,
                 weight_decay: float = 1e-3, batch_size: int = 4, batched: bool = True,
                 chunk_size: int = 2048, solve_dtype: str | None = None) -> None:
        super().__init__(chunk_size)
        self.config = FinetuneConfig(head=head, scale=scale, bias=bias, preset=preset, steps=steps,
                                     epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                     dampening=dampening, weight_decay=weight_decay)
        self.batched = bool(batched)
        if solve_dtype not in (None, "float32", "float64"):
            raise ConfigError(f"solve_dtype must be 'float32' or 'float64', got {solve_dtype!r}")
        self.solve_dtype = getattr(torch, solve_dtype) if solve_dtype else None

    def chunk_scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int,
                     start: int) -> Tensor:
        if self.batched:
            return finetune_scores(self.config, features, episodes, shot, seed, start, self.solve_dtype)
        return finetune_reference(self.config, features, episodes, shot, seed, start)


class _RowStats(NamedTuple):
    centre: Tensor | None      # subtracted from every row (features' dtype)
    norms: Tensor | None       # |row - centre| clamped at 1e-12 (normalize=True)
    sq: Tensor                 # |prepared row|^2


@register_evaluator("ncm", "protonet")
class NearestClassMean(FewShotMethod):
    """Nearest class mean (ProtoNet / SimpleShot-style) on frozen features.

    Per episode: optionally subtract a centre (``center_vector``, e.g. the mean base-class
    feature; else, with ``center=True``, the mean of the episode's support features), optionally
    L2-normalise (``normalize``), average each class's support into a prototype, and score
    queries by cosine similarity (``metric="cosine"``) or negative squared L2 distance
    (``metric="l2"``).  With ``metric="l2"`` and no normalisation, centering is a no-op
    (distances are translation invariant).  With a global centre (or none), each row's norm is
    computed once; each block of episodes gathers its rows and centres them in place, the norms
    scale the small score block, and one batched matmul scores it, in the features' precision.
    Per-episode centring (``center=True``) is computed in float64.
    """

    name = "ncm"

    def __init__(self, metric: str = "cosine", center: bool | None = None,
                 center_vector: Any = None, normalize: bool = False, chunk_size: int = 128) -> None:
        super().__init__(chunk_size)
        if metric not in ("cosine", "l2"):
            raise ConfigError(f"ncm metric must be 'cosine' or 'l2', got {metric!r}")
        if center is False and center_vector is not None:
            raise ConfigError("ncm: center=False contradicts a given center_vector")
        self.metric = metric
        self.center_vector = None if center_vector is None else torch.as_tensor(
            np.asarray(center_vector) if not isinstance(center_vector, Tensor) else center_vector
        ).to(torch.float64).flatten()
        self.center = bool(center) or self.center_vector is not None
        self.normalize = bool(normalize)

    def scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int = 0) -> Tensor:
        self._rows = None
        if not (self.center and self.center_vector is None):
            centre = self._centre(features)
            self._rows = self._row_stats(features, None if centre is None else centre.to(features.dtype))
        try:
            return super().scores(features, episodes, shot, seed)
        finally:
            self._rows = None

    def _centre(self, features: Tensor) -> Tensor | None:
        centre = self.center_vector
        if centre is not None:
            if centre.numel() != features.shape[1]:
                raise DataError(f"ncm center_vector has {centre.numel()} values, "
                                f"the features have {features.shape[1]} dims")
            centre = centre.to(features.device)
        return centre

    def _row_stats(self, features: Tensor, centre: Tensor | None) -> _RowStats:
        """Per-row norms (after centring) and |prepared row|^2, from blocks in one reused buffer.

        The centred, normalised table is never written: a fresh copy of a large table costs a
        page fault per 4 KB on every call, more than all the episodes' gathers (SimpleShot's
        loop prepares only the rows it uses).
        """
        n, dim = features.shape
        norms = torch.empty(n, dtype=features.dtype, device=features.device) if self.normalize else None
        sq = torch.empty(n, dtype=features.dtype, device=features.device)
        block = max(1, GATHER_BUDGET // dim)
        buf = features.new_empty(min(block, n), dim)
        tmp = torch.empty_like(buf)
        for s in range(0, n, block):
            k = min(block, n - s)
            rows = buf[:k].copy_(features[s:s + k])
            if centre is not None:
                rows.sub_(centre)
            if norms is not None:   # F.normalize's rule: x / max(|x|, 1e-12)
                norms[s:s + k] = torch.linalg.vector_norm(rows, dim=1).clamp_min_(1e-12)
                rows.div_(norms[s:s + k].unsqueeze(-1))
            torch.sum(torch.mul(rows, rows, out=tmp[:k]), -1, out=sq[s:s + k])
        return _RowStats(centre, norms, sq)

    def _table_scores(self, features: Tensor, episodes: Tensor, shot: int) -> Tensor:
        """Scores with a global centre ``m`` (or none): one bmm per block of gathered rows.

        A prepared row is ``r_i = (x_i - m) a_i`` with ``a_i = 1 / |x_i - m|`` under
        ``normalize`` (else 1).  The centre is subtracted on the gathered rows (``x_q . c - m . c``
        would cancel digits when ``|m|`` dwarfs the spread), but the norms enter algebraically:
        a prototype is the ``a``-weighted mean of centred supports (one small matmul) and a
        query's dot is ``a_q ((x_q - m) . c)``, scaled on the ``[way, nq]`` score block instead
        of dividing every gathered query row (one pass fewer over the largest buffer).
        """
        stats = self._rows
        e, way, m = episodes.shape
        nq, dim = way * (m - shot), features.shape[1]
        eps = episodes.to(features.device)
        sup, qry = eps[:, :, :shot].reshape(e, -1), eps[:, :, shot:].reshape(e, nq)
        out = torch.empty(e, nq, way, dtype=torch.float64, device=features.device)
        inv = None if stats.norms is None else stats.norms.reciprocal()
        step = max(1, _NCM_BLOCK // (way * m * dim))
        buf = features.new_empty(min(step, e) * way * m, dim)
        for s in range(0, e, step):
            k = min(step, e - s)
            si, qi = sup[s:s + k], qry[s:s + k]
            xs = gather_into(features, si, buf).view(k, way, shot, dim)
            if stats.centre is not None:   # on the rows: x . c - m . c would cancel digits
                xs.sub_(stats.centre)
            if inv is None:
                proto = xs.mean(2)
            else:
                proto = torch.matmul(inv[si].view(k, way, 1, shot) / shot, xs).squeeze(2)
            q = gather_into(features, qi, buf)
            if stats.centre is not None:
                q.sub_(stats.centre)
            dots = torch.bmm(proto, q.transpose(1, 2))                    # [k, way, nq]
            if inv is not None:
                dots.mul_(inv[qi].unsqueeze(1))
            dots = dots.transpose(1, 2)
            p2 = proto.square().sum(-1).unsqueeze(1)
            q2 = stats.sq[qi].unsqueeze(-1)
            if self.metric == "cosine":    # F.normalize's rule: x / max(|x|, 1e-12)
                out[s:s + k] = dots / (q2.sqrt().clamp_min(1e-12) * p2.sqrt().clamp_min(1e-12))
            else:
                out[s:s + k] = -(q2 - 2 * dots + p2).clamp_min(0)
        return out

    def chunk_scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int,
                     start: int) -> Tensor:
        if getattr(self, "_rows", None) is not None:
            return self._table_scores(features, episodes, shot)
        e = episodes.shape[0]
        dim = features.shape[1]
        eps = episodes.to(features.device)
        centre = self._centre(features)
        out = []
        rows_per_episode = eps.shape[1] * eps.shape[2]
        step = max(1, GATHER_BUDGET // (rows_per_episode * dim))
        buf = features.new_empty(min(step, e) * rows_per_episode, dim)
        for s in range(0, e, step):
            x = gather_into(features, eps[s:s + step], buf).to(torch.float64)   # [e', way, m, D]
            if centre is not None:
                x = x - centre
            elif self.center:
                x = x - x[:, :, :shot].mean((1, 2), keepdim=True)
            if self.normalize:
                x = F.normalize(x, dim=-1)
            proto = x[:, :, :shot].mean(2)                                # [e, way, D]
            q = x[:, :, shot:].reshape(x.shape[0], -1, dim)
            if self.metric == "cosine":
                out.append(torch.bmm(F.normalize(q, dim=-1), F.normalize(proto, dim=-1).transpose(1, 2)))
            else:
                d2 = (q.square().sum(-1, keepdim=True) - 2 * torch.bmm(q, proto.transpose(1, 2))
                      + proto.square().sum(-1).unsqueeze(1))
                out.append(-d2.clamp_min(0))
        return torch.cat(out)


@register_evaluator("logreg", "logistic")
class LogisticRegression(FewShotMethod):
    """Multinomial L2 logistic regression per episode (scikit-learn's objective).

    ``C`` is scikit-learn's inverse regularisation strength (default 1.0, as in RFS, Tian et
    al. 2020); ``l2 = 1 / C`` may be given instead.  Features are L2-normalised by default.
    """

    name = "logreg"

    def __init__(self, C: float | None = None, l2: float | None = None, normalize: bool = True,
                 fit_intercept: bool = True, max_iter: int = 50, tol: float = 1e-7,
                 chunk_size: int = 256) -> None:
        super().__init__(chunk_size)
        if C is not None and l2 is not None:
            raise ConfigError("logreg: give C or l2 (= 1 / C), not both")
        c = 1.0 if C is None and l2 is None else (float(C) if C is not None else 1.0 / float(l2))
        if not (0 < c < float("inf")):
            raise ConfigError(f"logreg C must be positive and finite, got {C if C is not None else 1 / l2!r}")
        self.C = c
        self.normalize, self.fit_intercept = bool(normalize), bool(fit_intercept)
        self.max_iter, self.tol = _positive_int("max_iter", max_iter), float(tol)

    def scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int = 0) -> Tensor:
        # The feature norms are computed once, not once per chunk.
        self._inv = inverse_norms(features) if self.normalize else None
        try:
            return super().scores(features, episodes, shot, seed)
        finally:
            self._inv = None

    def chunk_scores(self, features: Tensor, episodes: Tensor, shot: int, seed: int,
                     start: int) -> Tensor:
        return logreg_scores(features, episodes, shot, self.C, self.normalize, self.fit_intercept,
                             self.max_iter, self.tol, getattr(self, "_inv", None))
