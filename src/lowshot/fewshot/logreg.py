"""L2-regularised multinomial logistic regression for many episodes at once.

Objective per episode (scikit-learn's ``LogisticRegression(C=C)``, multinomial, intercept
not penalised)::

    sum_j CE(W x_j + b, y_j) + ||W||^2 / (2 C)

By the representer theorem the optimal ``W`` lies in the span of the support features, so we
solve in orthonormal support coordinates (``basis.py``): ``way * (n + 1)`` unknowns per episode.
Truncated Newton (Newton-CG with Hessian-vector products, see ``fit_logreg``) with a per-episode
backtracking (Armijo) line search: the ``(way (n + 1))^2`` Hessian is never formed, and every CG
stopping point, step length and convergence test is per episode, so episodes never influence
each other (results do not depend on how episodes are chunked).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .basis import gather_rows, inverse_norms, sub_chunk_size, support_basis

_STEPS = torch.tensor([0.5 ** i for i in range(12)], dtype=torch.float64)
_FIT_BUDGET_BYTES = 1 << 28  # working memory of one batched Newton-CG fit
_MAX_CG = 100                # CG iterations per Newton step (a safeguard: a few are typical)


def fit_logreg(coords: Tensor, y: Tensor, way: int, l2: float, fit_intercept: bool = True,
               max_iter: int = 50, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Fit on support coordinates ``[E, n, r]`` with labels ``y`` [n]; returns ``(A, b)``.

    Truncated Newton (Newton-CG) with Hessian-vector products only: memory and time per episode
    are ``O(n q way + q^2)``, never the ``(way q)^2`` Hessian.  Parameters ``theta = [A, b]``
    (``way x q``) are preconditioned by the exact Hessian at the start (uniform probabilities),
    ``P = (1/way) Z^T Z + l2 * mask = R^T R`` per class on class-centred directions (where every
    iterate lives: softmax gradients sum to zero over classes).  In ``u = theta R^T`` with
    ``Zu = Z R^-1`` the logits are ``Zu u^T``, the penalty is
    ``(|u|^2 - |logits|^2 / way) / 2`` and ``H v = Zu^T (S (Zu v^T) - Zu v^T / way) + v``
    (``S_j = diag(p_j) - p_j p_j^T``), so CG needs two small batched matmuls per iteration and
    starts at ``H = I``.  Every episode has its own CG stopping rule, step length and Newton
    stopping test (``max |dF/dtheta| < tol``); finished episodes leave the batch.
    """
    e, n, _ = coords.shape
    dt, dev = coords.dtype, coords.device
    ones = torch.ones(e, n, 1, dtype=dt, device=dev) if fit_intercept else coords.new_zeros(e, n, 0)
    z = torch.cat([coords, ones], -1)                                # [e, n, q]
    q = z.shape[-1]
    y1h = torch.nn.functional.one_hot(y.to(dev), way).to(dt).unsqueeze(0)   # [1, n, way]
    mask = torch.ones(q, dtype=dt, device=dev)
    if fit_intercept:
        mask[-1] = 0.0                                               # intercept not penalised
    prec = torch.bmm(z.transpose(1, 2), z).div_(way)
    prec.diagonal(dim1=-2, dim2=-1).add_(l2 * mask)
    low, _ = torch.linalg.cholesky_ex(prec)                          # P = low low^T, R = low^T
    eye = torch.eye(q, dtype=dt, device=dev).expand(e, q, q).contiguous()
    linv = torch.linalg.solve_triangular(low, eye, upper=False)     # R^-T
    zu = torch.bmm(z, linv.transpose(1, 2))                          # Z R^-1: [e, n, q]
    inv_way = 1.0 / way
    out = torch.zeros(e, way, q, dtype=dt, device=dev)
    steps = _STEPS.to(dev, dt)[1:]
    tiny = torch.finfo(dt).tiny
    # Working set: the episodes still fitting, compacted when some finish.
    idx, u, zi, lo = torch.arange(e, device=dev), out.clone(), zu, low
    logits = torch.zeros(e, n, way, dtype=dt, device=dev)

    def drop(keep: Tensor, *more: Tensor) -> tuple[Tensor, ...]:
        nonlocal idx, u, zi, lo
        out[idx[~keep]] = u[~keep]
        k = keep.nonzero().flatten()
        idx, u, zi, lo = idx[k], u[k], zi[k], lo[k]
        return tuple(m[k] for m in more)

    def objective(lg: Tensor, u_sq: Tensor) -> Tensor:
        ce = (torch.logsumexp(lg, -1) - (lg * y1h).sum(-1)).sum(-1)
        return ce + 0.5 * (u_sq - inv_way * lg.square().sum((-2, -1)))

    for _ in range(max_iter):
        prob = torch.softmax(logits, -1)
        grad = torch.baddbmm(u, (prob - y1h - inv_way * logits).transpose(1, 2), zi)
        gmax = torch.bmm(grad, lo.transpose(1, 2)).abs().amax((1, 2))   # dF/dtheta = grad R
        active = gmax >= tol                                         # per-episode stop
        if not bool(active.all()):
            logits, prob, grad = drop(active, logits, prob, grad)
            if idx.numel() == 0:
                break
        # CG on H d = -g, each episode to its own relative residual (forcing min(0.5, sqrt|g|)).
        gsq = grad.square().sum((1, 2))
        target = gsq * gsq.sqrt().clamp(max=0.25)
        d = torch.zeros_like(grad)
        dl = torch.zeros_like(logits)                                # Zu d^T, accumulated
        r = -grad
        p = r
        rs = gsq
        for _ in range(_MAX_CG):
            going = rs > target
            if not bool(going.any()):
                break
            zp = torch.bmm(zi, p.transpose(1, 2))                    # [a, n, way]
            sz = prob * (zp - (prob * zp).sum(-1, keepdim=True)) - inv_way * zp
            hp = torch.baddbmm(p, sz.transpose(1, 2), zi)
            php = (p * hp).sum((1, 2))
            alpha = torch.where(going & (php > 0), rs / php.clamp_min(tiny), torch.zeros_like(rs))
            d.add_(alpha.view(-1, 1, 1) * p)
            dl.add_(alpha.view(-1, 1, 1) * zp)
            r.sub_(alpha.view(-1, 1, 1) * hp)
            rs_new = r.square().sum((1, 2))
            beta = torch.where(going, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
            p = torch.where(going.view(-1, 1, 1), r + beta.view(-1, 1, 1) * p, p)
            rs = torch.where(going, rs_new, rs)
        # Per-episode backtracking (Armijo): the full step first, shorter ones where it fails.
        uu, ud, dd = u.square().sum((1, 2)), (u * d).sum((1, 2)), d.square().sum((1, 2))
        f0 = objective(logits, uu)
        slope = (grad * d).sum((1, 2))
        f1 = objective(logits + dl, uu + 2 * ud + dd)
        t = ((f1 <= f0 + 1e-4 * slope) & (slope < 0)).to(dt)
        retry = ((t == 0) & (slope < 0)).nonzero().flatten()
        if retry.numel():
            cand = logits[retry].unsqueeze(1) + steps.view(1, -1, 1, 1) * dl[retry].unsqueeze(1)
            u_sq = uu[retry, None] + 2 * steps * ud[retry, None] + steps.square() * dd[retry, None]
            f = objective(cand, u_sq)                                # [retry, len(steps)]
            ok = f <= f0[retry, None] + 1e-4 * steps * slope[retry, None]
            t[retry] = torch.where(ok.any(1), steps[ok.to(torch.uint8).argmax(1)], torch.zeros_like(f0[retry]))
        u = u + t.view(-1, 1, 1) * d
        logits = logits + t.view(-1, 1, 1) * dl
        moved = t > 0
        if not bool(moved.all()):  # an episode that cannot descend further is at its optimum
            (logits,) = drop(moved, logits)
            if idx.numel() == 0:
                break
    out[idx] = u
    theta = torch.bmm(out, linv)                                     # u R^-T
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
    # Newton-CG needs O(n q + q^2 + way (n + q)) floats per episode (q = basis size + 1; no Hessian);
    # fit in sub-chunks under a fixed memory budget (episodes are independent: results unchanged).
    q = coords.shape[-1] + 1
    per_episode = 8 * (4 * n * q + 5 * q * q + 12 * way * q + 32 * n * way)
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
