"""``evaluate_generalized``: batched scoring of every episode, calibration fitted on validation episodes."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, DataError
from ..api import as_feature_tensor, summarize
from ..episodes import _check_int, as_label_tensor, sample_episodes
from ..finetune import FinetuneConfig, episode_draws

from .classifier import BaseClassifier, _imprint, _method_for, _ncm_rows, finetune_novel_rows
from .constants import CALIBRATIONS, CRITERIA, CURVE_POINTS, METHODS, METRICS
from .metrics import (Reduced, _gamma_grid, criterion_at, episode_metrics, reduce_scores, sample_base_queries,
                      seen_unseen_curve)
from .results import GeneralizedReport, GeneralizedResult, Stat

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
        from ...longtail.decouple import tau_normalize   # the long-tail tau-norm, reused (lazy: no cycle)
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


# ----------------------------------------------------------------------------- the evaluator

def _stats(per_ep: dict[str, Tensor]) -> dict[str, Stat]:
    out = {}
    for k in METRICS:
        mean, _, ci = summarize(per_ep[k].cpu().numpy())
        out[k] = Stat(mean, ci)
    return out


def _check_choices(calibrations: Sequence[str], criterion: str, method: str) -> None:
    unknown = [c for c in calibrations if c not in CALIBRATIONS]
    if unknown or not calibrations:
        raise ConfigError(f"calibration must be among {CALIBRATIONS}, got {list(calibrations)!r}")
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if method not in METHODS:
        raise ConfigError(f"generalized method must be one of {METHODS}, got {method!r}")


def _check_arrays(clf: BaseClassifier, xb: Tensor, yb: Tensor, xn: Tensor, yn: Tensor) -> None:
    for x, y, what in ((xb, yb, "base"), (xn, yn, "novel")):
        if x.shape[0] != y.numel():
            raise DataError(f"{what}: {x.shape[0]} feature rows but {y.numel()} labels")
        if x.shape[1] != clf.weight.shape[1]:
            raise DataError(f"{what} features have {x.shape[1]} dims, the base classifier {clf.weight.shape[1]}")
    _labels_in_range(yb, clf.num_classes, "held-out base")


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
    _check_choices(calibrations, criterion, method)
    way = _check_int("way", way, 1)
    query = _check_int("query", query, 1)
    episodes = _check_int("episodes", episodes, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    base_query = way * query if base_query is None else _check_int("base_query", base_query, 1)
    val_episodes = episodes if val_episodes is None else _check_int("val_episodes", val_episodes, 1)
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
    _check_arrays(clf, xb, yb, xn, yn)
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
    from ...longtail.decouple import DEFAULT_TAU_GRID
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
            _fit_calibrations(scorer, vsplit, calibrations, taus, criterion, chosen, val_crit)
        tsplit = _Split(xn, xb, yb, sample_episodes(yn, way, shot, query, episodes, seed),
                        sample_base_queries(yb, base_query, episodes, seed))
        results += _test_results(scorer, tsplit, shot, calibrations, chosen, val_crit)
    return GeneralizedReport(way=way, query=query, base_query=base_query, episodes=episodes,
                             val_episodes=val_episodes if need_val else 0, seed=seed, method=method,
                             classifier=clf.kind, num_base_classes=clf.num_classes, criterion=criterion,
                             results=results, source=dict(source or {}))


def _fit_calibrations(scorer: _Scorer, vsplit: _Split, calibrations: Sequence[str], taus: list[float],
                      criterion: str, chosen: dict[str, dict[str, float]], val_crit: dict[str, float | None]) -> None:
    """Choose tau / gamma / the group scales on the validation episodes (never the test ones)."""
    vtaus: list[float | None] = [None] + (taus if "tau_norm" in calibrations else [])
    vred, vfull, vis_base = scorer.run(vsplit, vtaus, keep_full="scale" in calibrations)
    if "tau_norm" in calibrations:
        zero = torch.zeros(1, dtype=torch.float64, device=vis_base.device)
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
        sb, sn = fit_group_scales(vfull[0], vfull[1], scorer.clf.num_classes)
        chosen["scale"] = {"scale_base": sb, "scale_novel": sn}
        val_crit["scale"] = float(episode_metrics(vred[None], vis_base, scale_base=sb,
                                                  scale_novel=sn)[criterion].mean())


def _test_results(scorer: _Scorer, tsplit: _Split, shot: int, calibrations: Sequence[str],
                  chosen: dict[str, dict[str, float]], val_crit: dict[str, float | None]) -> list[GeneralizedResult]:
    """One result per calibration on the test episodes, with the parameters chosen on validation."""
    ttaus: list[float | None] = [None] + ([chosen["tau_norm"]["tau"]] if "tau_norm" in chosen else [])
    tred, _, is_base = scorer.run(tsplit, ttaus)
    out = []
    for cal in calibrations:
        red = tred[chosen["tau_norm"]["tau"]] if cal == "tau_norm" else tred[None]
        kw = {"gamma": chosen["bias"]["gamma"]} if cal == "bias" else (
            {"scale_base": chosen["scale"]["scale_base"], "scale_novel": chosen["scale"]["scale_novel"]}
            if cal == "scale" else {})
        per_ep = episode_metrics(red, is_base, **kw)
        sb, sn = kw.get("scale_base", 1.0), kw.get("scale_novel", 1.0)
        grid = _gamma_grid(sb * red.mb.double() - sn * red.mn.double(), CURVE_POINTS).sort().values
        cb, cn = seen_unseen_curve(red, is_base, grid, sb, sn)
        out.append(GeneralizedResult(
            shot=shot, calibration=cal, **_stats(per_ep), chosen=chosen[cal], val_criterion=val_crit[cal],
            curve={"gamma": grid.tolist(), "base": cb.tolist(), "novel": cn.tolist()},
            per_episode={k: v.cpu().tolist() for k, v in per_ep.items()}))
    return out
