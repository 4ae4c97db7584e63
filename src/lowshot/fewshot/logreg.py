"""L2-regularised multinomial logistic regression for many episodes at once.

Objective per episode (scikit-learn's ``LogisticRegression(C=C)``, multinomial, intercept
not penalised)::

    sum_j CE(W x_j + b, y_j) + ||W||^2 / (2 C)

By the representer theorem the optimal ``W`` lies in the span of the support features, so we
solve in orthonormal support coordinates (``basis.py``): ``way * (n + 1)`` unknowns per episode.
Damped Newton with the exact Hessian and a per-episode backtracking (Armijo) line search — every
step length is chosen per episode, so episodes never influence each other.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .basis import gather_rows, inverse_norms, sub_chunk_size, support_basis

_STEPS = torch.tensor([0.5 ** i for i in range(12)], dtype=torch.float64)
_FIT_BUDGET_BYTES = 1 << 30  # working memory of one batched Newton fit
_BIAS_RIDGE = 1e-9   # fixes the softmax shift invariance of the intercepts (no effect on predictions)


def _objective(logits: Tensor, y1h: Tensor, a_sq: Tensor, l2: float) -> Tensor:
    return (torch.logsumexp(logits, -1) - (logits * y1h).sum(-1)).sum(-1) + 0.5 * l2 * a_sq


def fit_logreg(coords: Tensor, y: Tensor, way: int, l2: float, fit_intercept: bool = True,
               max_iter: int = 50, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Fit on support coordinates ``[E, n, r]`` with labels ``y`` [n]; returns ``(A, b)``."""
    e, n, _ = coords.shape
    dt, dev = coords.dtype, coords.device
    ones = torch.ones(e, n, 1, dtype=dt, device=dev) if fit_intercept else coords.new_zeros(e, n, 0)
    z = torch.cat([coords, ones], -1)                                # [e, n, q]
    q = z.shape[-1]
    y1h = torch.nn.functional.one_hot(y.to(dev), way).to(dt).expand(e, n, way)
    theta = torch.zeros(e, way, q, dtype=dt, device=dev)
    mask = torch.ones(q, dtype=dt, device=dev)
    if fit_intercept:
        mask[-1] = 0.0                                               # intercept not penalised
    ridge = (l2 * mask + _BIAS_RIDGE * (1 - mask)).repeat(way)       # Hessian diagonal add-on
    zz = (z.unsqueeze(-1) * z.unsqueeze(-2)).reshape(e, n, q * q)
    steps = _STEPS.to(dev, dt)
    for _ in range(max_iter):
        logits = torch.bmm(z, theta.transpose(1, 2))                 # [e, n, way]
        prob = torch.softmax(logits, -1)
        grad = torch.bmm((prob - y1h).transpose(1, 2), z) + l2 * theta * mask   # [e, way, q]
        active = grad.abs().amax((1, 2)) >= tol      # per-episode stop: chunking-invariant
        if not bool(active.any()):
            break
        s = torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)    # [e, n, way, way]
        hess = torch.bmm(s.reshape(e, n, way * way).transpose(1, 2), zz)
        hess = hess.view(e, way, way, q, q).permute(0, 1, 3, 2, 4).reshape(e, way * q, way * q)
        hess.diagonal(dim1=-2, dim2=-1).add_(ridge)
        chol, _ = torch.linalg.cholesky_ex(hess)
        step = -torch.cholesky_solve(grad.reshape(e, -1, 1), chol).view(e, way, q)
        if fit_intercept:   # keep intercepts zero-mean: the softmax ignores their common shift
            step[..., -1] -= step[..., -1].mean(-1, keepdim=True)
        # Per-episode backtracking: evaluate all candidate step lengths at once.
        d_logits = torch.bmm(z, step.transpose(1, 2))
        cand = logits.unsqueeze(1) + steps.view(1, -1, 1, 1) * d_logits.unsqueeze(1)
        ta, ts = theta * mask, step * mask
        a_sq = (ta.pow(2).sum((1, 2)).unsqueeze(1) + 2 * steps * (ta * ts).sum((1, 2)).unsqueeze(1)
                + steps.pow(2) * ts.pow(2).sum((1, 2)).unsqueeze(1))
        f = _objective(cand, y1h.unsqueeze(1), a_sq, l2)                 # [e, len(steps)]
        f0 = _objective(logits, y1h, ta.pow(2).sum((1, 2)), l2)
        slope = (grad * step).sum((1, 2))
        ok = f <= f0.unsqueeze(1) + 1e-4 * steps * slope.unsqueeze(1)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(slope, -1, dtype=torch.long))
        t = torch.where((first >= 0) & active, steps[first.clamp_min(0)], torch.zeros_like(slope))
        if not bool((t > 0).any()):
            break                    # every episode is at the optimum up to rounding
        theta = theta + t.view(e, 1, 1) * step
    if fit_intercept:
        return theta[..., :-1], theta[..., -1]
    return theta, torch.zeros(e, way, dtype=dt, device=dev)


def logreg_scores(features: Tensor, episodes: Tensor, shot: int, C: float = 1.0,
                  normalize: bool = True, fit_intercept: bool = True, max_iter: int = 50,
                  tol: float = 1e-7) -> Tensor:
    """Query logits ``[E, way * query, way]`` (float64) for one chunk of episodes."""
    e, way, _ = episodes.shape
    n, dim, dev, f64 = way * shot, features.shape[1], features.device, torch.float64
    support = episodes[:, :, :shot].reshape(e, n).to(dev)
    query = episodes[:, :, shot:].reshape(e, -1).to(dev)
    inv = inverse_norms(features) if normalize else None
    s_sup = inv[support] if normalize else torch.ones(e, n, dtype=f64, device=dev)
    gram = torch.empty(e, n, n, dtype=f64, device=dev)
    sub = sub_chunk_size(n, dim)
    for s in range(0, e, sub):
        x = gather_rows(features, support[s:s + sub], f64)
        sc = s_sup[s:s + sub]
        gram[s:s + sub] = torch.bmm(x, x.transpose(1, 2)) * sc.unsqueeze(1) * sc.unsqueeze(2)
    coords, transform = support_basis(gram)
    y = torch.arange(way).repeat_interleave(shot)
    # Newton's Hessian is (way*q)^2 per episode (q = basis size + 1): 20-way 5-shot is ~33 MB per episode,
    # so fit in sub-chunks under a fixed memory budget (episodes are independent: results unchanged).
    q = coords.shape[-1] + 1
    per_episode = 8 * (3 * (way * q) ** 2 + n * q * q + 2 * n * way * way + 4 * n * way)
    step = max(1, _FIT_BUDGET_BYTES // per_episode)
    parts = [fit_logreg(coords[s:s + step], y, way, 1.0 / C, fit_intercept, max_iter, tol)
             for s in range(0, e, step)]
    a, b = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    coef = torch.bmm(a, transform) * s_sup.unsqueeze(1)              # weights on raw support rows
    out = torch.empty(e, query.shape[1], way, dtype=f64, device=dev)
    sub = sub_chunk_size(n + query.shape[1], dim)
    for s in range(0, e, sub):
        w = torch.bmm(coef[s:s + sub], gather_rows(features, support[s:s + sub], f64))
        logits = torch.bmm(gather_rows(features, query[s:s + sub], f64), w.transpose(1, 2))
        out[s:s + sub] = logits * inv[query[s:s + sub]].unsqueeze(-1) if normalize else logits
    return out + b.unsqueeze(1)
