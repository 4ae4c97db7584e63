"""L2-regularised multinomial logistic regression for many episodes at once.

Objective per episode (scikit-learn's ``LogisticRegression(C=C)``, multinomial, intercept
not penalised)::

    sum_j CE(W x_j + b, y_j) + ||W||^2 / (2 C)

By the representer theorem the optimal ``W`` lies in the span of the support features, so we
solve in orthonormal support coordinates (``basis.py``): ``way * (n + 1)`` unknowns per episode.
The coordinates are centred on the support mean (exact: the free intercept absorbs the shift),
which decouples the intercept from the weights, so a diagonal preconditioner already makes the
Hessian well conditioned (``kappa <= 1 + lambda_max(centred Gram) C / way``) and every Newton
step needs a few conjugate-gradient iterations, each two small batched matmuls.

Mixed precision, exact result: truncated Newton (Newton-CG, Hessian-vector products only, per-
episode Armijo line search) runs in float32 to a gradient of ``_PHASE1_TOL``; then iterative
refinement takes full Newton steps whose gradient, logits and test ``max |dF/dtheta| < tol`` are
float64 (only the correction's CG solve is float32), so the returned optimum is float64-exact.
Every CG stopping point, step length and convergence test is per episode and finished episodes
leave the batch, so episodes never influence each other (results do not depend on chunking).

Back to feature space through the optimality condition ``W = C sum_j (y_j - p_j) x_j``
(the support rows' weights are ``C (Y - P)``, bounded by ``C``): no inverse of the basis, no
amplification of rounding by an ill-conditioned support.  Query logits are one batched matmul in
the features' precision.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .basis import GATHER_BUDGET, gather_into, inverse_norms, support_basis

_STEPS = [0.5 ** i for i in range(1, 12)]   # backtracking step lengths after the full step
_FIT_BUDGET_BYTES = 1 << 26  # working memory of one batched Newton-CG fit (about; see per_episode)
_MAX_CG = 100                # CG iterations per Newton step (a safeguard: a few are typical)
_PHASE1_TOL = 1e-4           # float32 Newton stops here (well above float32 gradient noise)
_REFINE_STEPS = 6            # float64-residual Newton steps (2-3 are typical)
_REFINE_CG = 20              # CG iterations per refinement step (float32 CG stalls near 1e-6)
_REFINE_RTOL = 1e-8          # squared relative CG residual per refinement step
_POLISH_TOL = 1e-12          # refinement goes on to about float64 resolution (see _refine)


def _phi(x: Tensor) -> Tensor:
    """``exp(x) - 1 - x`` without cancellation for small ``|x|`` (Taylor to ``x^6``)."""
    small = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return torch.where(x.abs() < 0.2, small, torch.expm1(x) - x)


def _pcg(z: Tensor, zt: Tensor, minv: Tensor, p: Tensor, g: Tensor, pen: Tensor,
         target: Tensor, max_iter: int = _MAX_CG) -> tuple[Tensor, Tensor]:
    """Per-episode preconditioned CG on ``H d = -g``; returns ``(d, Z d^T)``.

    Shapes: ``z`` [a, n, q], ``zt`` its transpose (contiguous: the fast matmul layout), ``minv``
    [a, 1, q] inverse diagonal preconditioner, ``p`` [a, way, n] probabilities, ``g`` [a, way, q],
    ``pen`` [q] (``l2`` on weights, 0 on the intercept).  ``H v = Z^T S (Z v^T) + pen v`` with
    ``S_j = diag(p_j) - p_j p_j^T``.  Episode ``i`` stops once ``|r_i|^2 <= target_i``.
    """
    tiny = torch.finfo(g.dtype).tiny
    r = -g
    s = r * minv
    pdir = s
    rz = (r * s).sum((1, 2))
    d = torch.zeros_like(g)
    dl = torch.zeros_like(p)
    zero = torch.zeros_like(rz)
    for _ in range(max_iter):
        going = r.square().sum((1, 2)) > target
        if not bool(going.any()):
            break
        v = torch.bmm(pdir, zt)                                       # Z p^T: [a, way, n]
        sv = p * (v - (p * v).sum(1, keepdim=True))
        hp = torch.baddbmm(pdir * pen, sv, z)
        php = (pdir * hp).sum((1, 2))
        alpha = torch.where(going & (php > 0), rz / php.clamp_min(tiny), zero).view(-1, 1, 1)
        d.add_(alpha * pdir)
        dl.add_(alpha * v)
        r.sub_(alpha * hp)
        s = r * minv
        rz_new = (r * s).sum((1, 2))
        beta = torch.where(going, rz_new / rz.clamp_min(tiny), zero).view(-1, 1, 1)
        pdir = torch.where(going.view(-1, 1, 1), s + beta * pdir, pdir)
        rz = torch.where(going, rz_new, rz)
    return d, dl


def _decrease(t: Tensor, slope: Tensor, p: Tensor, dl: Tensor, mu: Tensor, dpen: Tensor) -> Tensor:
    """``F(theta + t d) - F(theta)`` for step lengths ``t`` [a, s] (stable in float32).

    ``= t g.d + sum_j log(sum_c p_jc phi(t (dl_jc - mu_j))) + t^2 d.pen.d / 2``: the linear term
    is exact and the rest a sum of small nonnegative terms, so tiny decreases near the optimum
    are resolved instead of drowning in the rounding of two objective values.
    """
    delta = t[:, :, None, None] * (dl - mu).unsqueeze(1)              # [a, s, way, n]
    curv = torch.log1p((p.unsqueeze(1) * _phi(delta)).sum(2)).sum(-1)
    return t * slope[:, None] + curv + 0.5 * t * t * dpen[:, None]


def _newton32(z: Tensor, zt: Tensor, minv: Tensor, yt: Tensor, pen: Tensor, max_iter: int,
              tol: float) -> Tensor:
    """Float32 Newton-CG from ``theta = 0`` until ``max |grad| < tol``; returns theta [e, way, q]."""
    e, n, q = z.shape
    way = yt.shape[1]
    out = z.new_zeros(e, way, q)
    idx = torch.arange(e, device=z.device)
    theta = out.clone()
    lg = z.new_zeros(e, way, n)
    steps = torch.tensor(_STEPS, dtype=z.dtype, device=z.device)

    def keep(mask: Tensor, *more: Tensor) -> tuple[Tensor, ...]:
        nonlocal idx, theta, lg, z, zt, minv
        out[idx[~mask]] = theta[~mask]
        k = mask.nonzero().flatten()
        idx, theta, lg, z, zt, minv = idx[k], theta[k], lg[k], z[k], zt[k], minv[k]
        return tuple(m[k] for m in more)

    for _ in range(max_iter):
        p = torch.softmax(lg, 1)
        g = torch.baddbmm(theta * pen, p - yt, z)
        active = g.abs().amax((1, 2)) >= tol
        if not bool(active.all()):
            p, g = keep(active, p, g)
            if idx.numel() == 0:
                break
        gsq = g.square().sum((1, 2))
        d, dl = _pcg(z, zt, minv, p, g, pen, gsq * gsq.sqrt().clamp(max=0.25))
        slope = (g * d).sum((1, 2))
        dpen = (d * d * pen).sum((1, 2))
        mu = (p * dl).sum(1, keepdim=True)
        one = torch.ones_like(slope)[:, None]
        t = ((_decrease(one, slope, p, dl, mu, dpen)[:, 0] <= 1e-4 * slope) & (slope < 0)).to(z.dtype)
        retry = ((t == 0) & (slope < 0)).nonzero().flatten()
        if retry.numel():
            ts = steps.expand(retry.numel(), -1)
            f = _decrease(ts, slope[retry], p[retry], dl[retry], mu[retry], dpen[retry])
            ok = f <= 1e-4 * ts * slope[retry, None]
            t[retry] = torch.where(ok.any(1), steps[ok.to(torch.uint8).argmax(1)], torch.zeros_like(slope[retry]))
        theta = theta + t.view(-1, 1, 1) * d
        lg = lg + t.view(-1, 1, 1) * dl
        moved = t > 0
        if not bool(moved.all()):   # cannot descend in float32: refinement takes over
            keep(moved)
            if idx.numel() == 0:
                break
    out[idx] = theta
    return out


def _refine(z64: Tensor, z: Tensor, zt: Tensor, minv: Tensor, yt: Tensor, pen64: Tensor,
            theta: Tensor, tol: float) -> Tensor:
    """Newton steps with float64 gradients (float32 CG corrections) to ``max |grad| < tol``.

    Mixed-precision iterative refinement: the step is computed to ~1e-5 relative accuracy, so
    the gradient shrinks by ~1e5 per step from the float32 start.  It goes on to
    ``min(tol, _POLISH_TOL)``: the float32 phase's matmuls round differently for some shapes
    depending on an episode's position in the batch (MKL), and polishing to about float64
    resolution makes the result independent of that start, i.e. of chunking.  A step that does
    not reduce the episode's gradient is undone and the episode stops (float64 resolution).
    """
    e = theta.shape[0]
    out = theta.clone()
    idx = torch.arange(e, device=theta.device)
    pen32 = pen64.to(z.dtype)
    prev = torch.full((e,), float("inf"), dtype=theta.dtype, device=theta.device)
    before = theta
    for k in range(_REFINE_STEPS + 1):
        p = torch.softmax(torch.bmm(theta, z64.transpose(1, 2)), 1)
        g = torch.baddbmm(theta * pen64, p - yt, z64)
        gmax = g.abs().amax((1, 2))
        worse = gmax >= prev
        done = worse | (gmax < min(tol, _POLISH_TOL)) if k < _REFINE_STEPS else torch.ones_like(worse)
        if bool(done.any()):
            out[idx[done]] = torch.where(worse[done].view(-1, 1, 1), before[done], theta[done])
            k_ = (~done).nonzero().flatten()
            idx, theta, p, g, prev = idx[k_], theta[k_], p[k_], g[k_], gmax[k_]
            z64, z, zt, minv = z64[k_], z[k_], zt[k_], minv[k_]
            if idx.numel() == 0:
                break
        else:
            prev = gmax
        g32 = g.to(z.dtype)
        d, _ = _pcg(z, zt, minv, p.to(z.dtype), g32, pen32, g32.square().sum((1, 2)) * _REFINE_RTOL,
                    _REFINE_CG)
        before = theta
        theta = theta + d.to(theta.dtype)
    return out


def fit_logreg(coords: Tensor, y: Tensor, way: int, l2: float, fit_intercept: bool = True,
               max_iter: int = 50, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Fit on support coordinates ``[E, n, r]`` (float64) with labels ``y`` [n].

    Returns ``(alpha, b)``: ``alpha`` [E, way, n] are the weights of the (normalised) support
    rows, ``W = alpha X``, and ``b`` [E, way] the intercepts; the optimum satisfies
    ``max |dF/dtheta| < tol`` in float64 (theta: weights in support coordinates and intercept).
    """
    e, n, _ = coords.shape
    f64, dev = torch.float64, coords.device
    coords = coords.to(f64)
    if fit_intercept:
        cbar = coords.mean(1, keepdim=True)                          # [e, 1, r]
        z64 = torch.cat([coords - cbar, torch.ones(e, n, 1, dtype=f64, device=dev)], -1)
    else:
        z64 = coords
    q = z64.shape[-1]
    pen64 = torch.full((q,), float(l2), dtype=f64, device=dev)
    if fit_intercept:
        pen64[-1] = 0.0                                              # intercept not penalised
    yt = torch.nn.functional.one_hot(y.to(dev), way).to(f64).t().unsqueeze(0)   # [1, way, n]
    z = z64.to(torch.float32)
    zt = z.transpose(1, 2).contiguous()
    pen = pen64.float()
    # Diagonal of the Hessian at theta = 0 (uniform p, class-centred directions).
    minv = (z.square().sum(1, keepdim=True) / way + pen).reciprocal_()
    theta = _newton32(z, zt, minv, yt.float(), pen, max_iter, max(tol, _PHASE1_TOL)).to(f64)
    theta = _refine(z64, z, zt, minv, yt, pen64, theta, tol)
    p = torch.softmax(torch.bmm(theta, z64.transpose(1, 2)), 1)
    resid = yt - p                                                   # [e, way, n]
    if not fit_intercept:
        return resid / l2, torch.zeros(e, way, dtype=f64, device=dev)
    # Centred rows: W = C (Y - P)(X - mean X); the intercept moves back to uncentred rows.
    alpha = (resid - resid.mean(2, keepdim=True)) / l2
    bias = theta[..., -1] - torch.bmm(theta[..., :-1], cbar.transpose(1, 2)).squeeze(-1)
    # Softmax ignores a common shift of the intercepts; fix it (sum 0, as the weights' optimum
    # has) instead of keeping the float32 phase's rounding drift.
    return alpha, bias - bias.mean(1, keepdim=True)


def logreg_scores(features: Tensor, episodes: Tensor, shot: int, C: float = 1.0,
                  normalize: bool = True, fit_intercept: bool = True, max_iter: int = 50,
                  tol: float = 1e-7, inv: Tensor | None = None) -> Tensor:
    """Query logits ``[E, way * query, way]`` (float64) for one chunk of episodes.

    ``inv`` (optional) are the features' inverse norms (``inverse_norms``), computed once per
    call of ``LogisticRegression.scores`` rather than once per chunk.
    """
    e, way, m = episodes.shape
    n, nq, dim, dev, f64 = way * shot, way * (m - shot), features.shape[1], features.device, torch.float64
    support = episodes[:, :, :shot].reshape(e, n).to(dev)
    query = episodes[:, :, shot:].reshape(e, nq).to(dev)
    if normalize:
        inv = inverse_norms(features) if inv is None else inv
        s_sup = inv[support]
    else:
        s_sup = torch.ones(e, n, dtype=f64, device=dev)
    # Gram matrices in float64 (they set the basis), from blocks of gathered rows.
    gram = torch.empty(e, n, n, dtype=f64, device=dev)
    sub = max(1, GATHER_BUDGET // (n * dim))
    buf = features.new_empty(min(sub, e) * n, dim)
    buf64 = buf if features.dtype == f64 else torch.empty(buf.shape, dtype=f64, device=dev)
    for s in range(0, e, sub):
        k = min(sub, e - s)
        x = gather_into(features, support[s:s + k], buf)
        if buf64 is not buf:
            x = buf64[:k * n].view(k, n, dim).copy_(x)
        torch.bmm(x, x.transpose(1, 2), out=gram[s:s + k])
    if normalize:
        gram.mul_(s_sup.unsqueeze(1) * s_sup.unsqueeze(2))
    coords, _ = support_basis(gram, transform=False)
    del gram, buf64
    y = torch.arange(way).repeat_interleave(shot)
    # Newton-CG needs O(n q + way (n + q)) floats per episode (q = n + 1; no Hessian);
    # fit in sub-chunks under a fixed memory budget (episodes are independent: results unchanged).
    q = n + 1
    per_episode = 24 * n * q + 64 * way * q + 128 * way * n
    step = max(1, _FIT_BUDGET_BYTES // per_episode)
    parts = [fit_logreg(coords[s:s + step], y, way, 1.0 / C, fit_intercept, max_iter, tol)
             for s in range(0, e, step)]
    del coords
    alpha, b = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    coef = (alpha * s_sup.unsqueeze(1)).to(features.dtype)          # weights on raw support rows
    # Query logits in the features' precision: W = coef X_s, logits = X_q W^T (the weights are
    # bounded by C, so nothing amplifies the rounding of these products).
    out = torch.empty(e, nq, way, dtype=f64, device=dev)
    q_scale = inv[query] if normalize else None
    sub = max(1, GATHER_BUDGET // (nq * dim))
    bq = features.new_empty(min(sub, e) * max(n, nq), dim)
    for s in range(0, e, sub):
        k = min(sub, e - s)
        w = torch.bmm(coef[s:s + k], gather_into(features, support[s:s + k], bq))
        logits = torch.bmm(gather_into(features, query[s:s + k], bq), w.transpose(1, 2))
        out[s:s + k] = logits
    if normalize:
        out.mul_(q_scale.unsqueeze(-1))
    return out.add_(b.unsqueeze(1))
