"""Fine-tune a fresh linear/cosine head per episode (Baseline++ / Negative-Margin meta-test).

Protocol (both public implementations agree except on the stopping rule):

* head: ``cosine`` = ``scale * cos(x, w_c)`` (features *and* weights L2-normalised, no bias,
  no margin at meta-test, scale 5) or ``linear`` = ``scale * (W x + b)`` (``nn.Linear``;
  ``bias=False, scale=5`` equals the "neg-softmax" meta-test head, whose row-min shift
  cancels in the softmax).  Weights ~ U(-1/sqrt(D), 1/sqrt(D)) (``kaiming_uniform_(a=sqrt(5))``,
  also ``nn.Linear``'s bias bound), drawn in float32 from a per-episode-block generator.
* ``torch.optim.SGD(lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)`` on all head
  parameters (bias included), mean cross-entropy over mini-batches of 4 from the support set,
  reshuffled every pass, last partial batch kept (mmfewshot: DataLoader ``shuffle=True,
  drop_last=False``; bl0: ``range(0, n, 4)`` over a fresh ``np.random.permutation``).
* stopping: ``preset="mmfewshot"`` counts mini-batches (150 steps for 1-shot, 600 otherwise,
  ``num_steps`` in its configs); ``preset="bl0"`` runs 100 passes over the support set
  (``finetune_params.iter=100`` in the official negative-margin repo).

The batched solver runs this exactly, for all episodes at once, in each episode's support
span plus one extra coordinate per head row (the part of its initial weight outside that
span, which only weight decay and the cosine normalisation can rescale); see ``basis.py``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .basis import GATHER_BUDGET, gather_into, inverse_norms, support_basis

PRESETS = ("mmfewshot", "bl0")
_RNG_BLOCK = 64          # episodes per generator: draws do not depend on chunk_size
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines the per-episode fine-tune (shared by both implementations)."""

    head: str = "cosine"
    scale: float | None = None     # cosine: 5.0, linear: 1.0
    bias: bool = True              # linear head only
    preset: str = "mmfewshot"
    steps: int | None = None       # overrides the preset (mini-batch updates)
    epochs: int | None = None      # overrides the preset (passes over the support set)
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        if self.head not in ("cosine", "linear"):
            raise ConfigError(f"finetune head must be 'cosine' or 'linear', got {self.head!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"finetune preset must be one of {PRESETS}, got {self.preset!r}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("finetune: give steps or epochs, not both")
        for name in ("steps", "epochs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ConfigError(f"finetune {name} must be an integer >= 0, got {v!r}")
        bs = self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
            raise ConfigError(f"finetune batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.scale is None:
            object.__setattr__(self, "scale", 5.0 if self.head == "cosine" else 1.0)
        for name in ("lr", "momentum", "dampening", "weight_decay", "scale"):
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (name == "scale" and value == 0):
                raise ConfigError(f"finetune {name} must be a finite number "
                                  f"{'> 0' if name == 'scale' else '>= 0'}, got {value!r}")

    @property
    def has_bias(self) -> bool:
        return self.head == "linear" and self.bias

    def num_steps(self, n_support: int, shot: int) -> int:
        """Mini-batch updates for a support set of ``n_support`` samples."""
        per_pass = math.ceil(n_support / self.batch_size)
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * per_pass
        if self.preset == "mmfewshot":
            return 150 if shot == 1 else 600
        return 100 * per_pass


class Draws(NamedTuple):
    weight: Tensor   # [E, way, D] float32 initial head weights
    bias: Tensor     # [E, way] float32 initial bias (drawn even when unused)
    perms: Tensor    # [E, passes, n] int16/int32 support order of each pass (episodes on the unit stride)


def _mix(seed: int, block: int) -> int:
    """splitmix64 of (seed, block): independent, platform-free generator seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _shuffles(u: Tensor, n: int) -> Tensor:
    """Fisher-Yates permutations of ``range(n)``, one per column of uniforms ``u`` [n-1, R].

    Swap ``i`` takes ``j = floor(u[i-1] * (i + 1))``; float32 uniforms have 24 random bits, so
    each ``j`` is uniform up to a relative 2^-24 * n (``np.random.permutation``: exact).
    Returns ``[n, R]`` (column ``k`` is the permutation drawn from ``u[:, k]``).
    """
    rows = u.shape[1]
    small = torch.int16 if n < (1 << 15) else torch.int32                     # compact storage
    perm = torch.arange(n, dtype=small).unsqueeze(1).repeat(1, rows)          # [n, R]
    for i in range(n - 1, 0, -1):
        j = (u[i - 1] * (i + 1)).long().clamp_(max=i).unsqueeze(0)
        keep = perm[i].clone()
        perm[i] = perm.gather(0, j).squeeze(0)
        perm.scatter_(0, j, keep.unsqueeze(0))
    return perm


def episode_draws(seed: int, start: int, stop: int, way: int, dim: int, n_support: int,
                  passes: int) -> Draws:
    """Initial head and shuffles of episodes ``start..stop-1`` (same for any chunking)."""
    bound = 1.0 / math.sqrt(dim)
    first, last = start // _RNG_BLOCK, (stop - 1) // _RNG_BLOCK
    count = (last - first + 1) * _RNG_BLOCK
    weight = torch.empty(count, way, dim)
    bias = torch.empty(count, way)
    u = torch.empty(max(n_support - 1, 0), count * passes)                    # [n-1, E*passes]
    cols = _RNG_BLOCK * passes
    for i, block in enumerate(range(first, last + 1)):
        gen = torch.Generator().manual_seed(_mix(seed, block))
        sl = slice(i * _RNG_BLOCK, (i + 1) * _RNG_BLOCK)
        weight[sl].uniform_(-bound, bound, generator=gen)
        bias[sl].uniform_(-bound, bound, generator=gen)
        u[:, i * cols:(i + 1) * cols] = torch.rand(u.shape[0], cols, generator=gen)
    lo, hi = start - first * _RNG_BLOCK, stop - first * _RNG_BLOCK
    e = hi - lo
    # Shuffle in (pass, episode) column order: each column's permutation depends only on its own
    # uniforms, and the result, viewed [E, passes, n], has episodes on the unit stride, which
    # makes the solver's per-pass [n, E] orders one contiguous copy instead of a strided one.
    rows = u.shape[0]
    u = u[:, lo * passes:hi * passes].reshape(rows, e, passes).transpose(1, 2).reshape(rows, passes * e)
    perms = _shuffles(u, n_support).view(n_support, passes, e).permute(2, 1, 0)
    return Draws(weight[lo:hi], bias[lo:hi], perms)


def _solve(cfg: FinetuneConfig, A: Tensor, bias: Tensor, coords: Tensor, perms: Tensor,
           shot: int, steps: int) -> None:
    """Run the SGD trajectory on coordinates ``A`` [r + 1, way, E] and ``bias`` [way, E] in place.

    ``coords`` [r, n, E] are the support coordinates (row ``r`` of ``A`` is the part of the
    initial weight outside the support span: no feature has a component there).  Updates
    follow torch.optim.SGD exactly: ``g = grad + wd * p``; ``buf = g`` on the first step, else
    ``buf = mom * buf + (1 - damp) * g``; ``p -= lr * buf``.  Episodes sit on the last
    (contiguous) axis, so every op is elementwise across episodes (tiny per-episode matmuls
    would be dominated by per-matrix overhead) and no quantity is shared between episodes.
    """
    r, n, e = coords.shape
    way = A.shape[1]
    bsz, lr, mom, wd = cfg.batch_size, float(cfg.lr), float(cfg.momentum), float(cfg.weight_decay)
    scale, cosine, use_bias = float(cfg.scale), cfg.head == "cosine", cfg.has_bias
    per_pass = math.ceil(n / bsz)
    ar = torch.arange(e, device=A.device)
    classes = torch.arange(way, device=A.device).view(1, way, 1)
    flat = coords.reshape(r, n * e)
    rows = flat.t().contiguous() if flat.dtype != torch.float32 else None
    buf = torch.zeros_like(A)
    bbuf = torch.zeros_like(bias)
    prod = torch.empty_like(A[:r])                                      # reused work buffers
    numb = torch.empty(min(bsz, n), way, e, dtype=A.dtype, device=A.device)
    sq = torch.empty_like(A)
    span, bspan = A[:r], buf[:r]
    xp = yp = A  # set at each pass start
    # Every pass's support order as [passes, n, E] int64 at once: a per-pass int16 -> int64
    # copy cost about as much as the pass's column gather (int32 arithmetic is slower); the
    # draws keep episodes on the unit stride, so this is one streaming copy.
    orders = perms.to(A.device).permute(1, 2, 0).to(torch.int64).contiguous()
    for t in range(steps):
        p, j = divmod(t, per_pass)
        if j == 0:
            order = orders[p]                                            # [n, E]
            index = (order * e + ar).reshape(-1)
            if rows is None:   # float32: a column gather is fastest
                xp = flat.index_select(1, index).view(r, n, e)
            else:              # float64 column gathers are slow on CPU: gather rows, transpose
                xp = F.embedding(index, rows).t().contiguous().view(r, n, e)
            yp = ((order // shot).unsqueeze(1) == classes).to(A.dtype)    # [n, way, E]
        lo, hi = j * bsz, min(n, (j + 1) * bsz)
        xb, yb, b = xp[:, lo:hi], yp[lo:hi], hi - lo
        first = t == 0
        c = 1.0 if (first or mom == 0) else 1.0 - float(cfg.dampening)
        m = 0.0 if first else mom
        num = numb[:b]                                                    # [b, way, E] = w_c . x_b
        for i in range(b):   # per sample: a [r, way, E] product stays in cache, [r, b, way, E] did not
            torch.sum(torch.mul(span, xb[:, i].unsqueeze(1), out=prod), 0, out=num[i])
        if cosine:
            inv = torch.mul(A, A, out=sq).sum(0).rsqrt_()                 # 1 / |w_c| (mul: pow is slower)
            logits = num * (inv * scale)
        else:
            logits = num + bias if use_bias else num.clone()
            if scale != 1.0:
                logits.mul_(scale)
        logits.sub_(logits.amax(1, keepdim=True)).exp_()
        prob = logits.div_(logits.sum(1, keepdim=True))
        g = prob.sub_(yb).mul_(scale / b)             # dCE/d(cos) or dCE/d(Wx+b), batch mean
        if cosine:
            # d cos_bc / d w_c = x_b / |w_c| - (w_c . x_b) w_c / |w_c|^3
            dot = (g * num).sum(0)
            coef = (wd - dot * inv * inv * inv) * c
            gamma = g.mul_(inv * c)
        else:
            if use_bias:
                gb = g.sum(0).add_(bias, alpha=wd).mul_(c)
                bbuf = gb if first else gb.add_(bbuf, alpha=m)
                bias.add_(bbuf, alpha=-lr)
            gamma = g.mul_(c)
            coef = None
        if first:
            buf.zero_()
        elif m != 1.0:
            buf.mul_(m)
        for i in range(b):
            bspan.addcmul_(xb[:, i].unsqueeze(1), gamma[i].unsqueeze(0))
        if coef is None:
            buf.add_(A, alpha=wd * c)
        else:
            buf.addcmul_(A, coef.unsqueeze(0))
        A.add_(buf, alpha=-lr)


def finetune_scores(cfg: FinetuneConfig, features: Tensor, episodes: Tensor, shot: int,
                    seed: int, start: int = 0, solve_dtype: torch.dtype | None = None) -> Tensor:
    """Query logits ``[E, way * query, way]`` for one chunk of episodes (batched, exact).

    Gram matrices and the basis are float64; the SGD runs in ``solve_dtype`` (default: the
    features' dtype, i.e. the precision the per-episode loop would use).
    """
    e, way, _ = episodes.shape
    n, dim, dev, f64 = way * shot, features.shape[1], features.device, torch.float64
    solve_dtype = solve_dtype or features.dtype
    steps = cfg.num_steps(n, shot)
    passes = max(1, math.ceil(steps / math.ceil(n / cfg.batch_size)))
    draws = episode_draws(seed, start, start + e, way, dim, n, passes)
    w0 = draws.weight.to(dev)
    cosine = cfg.head == "cosine"
    support = episodes[:, :, :shot].reshape(e, n).to(dev)
    query = episodes[:, :, shot:].reshape(e, -1).to(dev)

    # Cosine head: features enter only through x / |x|; fold 1/|x| into products instead.
    inv = inverse_norms(features) if cosine else None
    s_sup = inv[support] if cosine else torch.ones(e, n, dtype=f64, device=dev)
    gram = torch.empty(e, n, n, dtype=f64, device=dev)
    cross = torch.empty(e, way, n, dtype=f64, device=dev)
    w0f = w0.to(features.dtype)
    w0n2 = w0f.square().sum(-1).to(f64)
    sub = max(1, GATHER_BUDGET // (n * dim))
    buf = features.new_empty(min(sub, e) * n, dim)
    buf64 = buf if features.dtype == f64 else torch.empty(buf.shape, dtype=f64, device=dev)
    for s in range(0, e, sub):
        k = min(sub, e - s)
        x = gather_into(features, support[s:s + k], buf)
        # The Gram matrix sets the basis: float64; the rest: the features' precision.
        x64 = x if buf64 is buf else buf64[:k * n].view(k, n, dim).copy_(x)
        torch.bmm(x64, x64.transpose(1, 2), out=gram[s:s + k])
        cross[s:s + k] = torch.bmm(w0f[s:s + k], x.transpose(1, 2))
    gram.mul_(s_sup.unsqueeze(1) * s_sup.unsqueeze(2))
    cross.mul_(s_sup.unsqueeze(1))
    coords, transform = support_basis(gram)
    a0 = torch.bmm(cross, transform.transpose(1, 2))                  # [e, way, n]
    res2 = (w0n2 - a0.square().sum(-1)).clamp_min(0)
    has_res = res2 > 1e-12 * w0n2
    beta0 = torch.where(has_res, res2.sqrt(), torch.zeros_like(res2))
    A = torch.cat([a0, beta0.unsqueeze(-1)], -1).permute(2, 1, 0).to(solve_dtype).contiguous()
    xc = coords.permute(2, 1, 0).to(solve_dtype).contiguous()         # [n coords, n samples, e]
    bias = draws.bias.to(dev, solve_dtype).t().contiguous()
    _solve(cfg, A, bias, xc, draws.perms, shot, steps)
    A = A.permute(2, 1, 0).to(f64)                                    # [e, way, n + 1]
    # Back to feature space: W = (A_r - rho a0) T X + rho W0, with rho = beta / beta0.
    rho = torch.where(has_res, A[..., -1] / beta0.clamp_min(1e-300), torch.zeros_like(beta0))
    coef = torch.bmm(A[..., :n] - rho.unsqueeze(-1) * a0, transform)  # [e, way, n]
    if cosine:
        out_scale = float(cfg.scale) / A.square().sum(-1).sqrt()
    else:
        out_scale = torch.full((e, way), float(cfg.scale), dtype=f64, device=dev)
    coef = coef * s_sup.unsqueeze(1)                                   # weights on raw rows
    nq = query.shape[1]
    out = torch.empty(e, nq, way, dtype=features.dtype, device=dev)
    rho_f = rho.to(features.dtype).unsqueeze(-1)
    sub = max(1, GATHER_BUDGET // (max(n, nq) * dim))
    buf = features.new_empty(min(sub, e) * max(n, nq), dim)
    buf64 = buf if features.dtype == f64 else torch.empty(min(sub, e) * n, dim, dtype=f64, device=dev)
    for s in range(0, e, sub):
        k = min(sub, e - s)
        x = gather_into(features, support[s:s + k], buf)
        x64 = x if buf64 is buf else buf64[:k * n].view(k, n, dim).copy_(x)
        w = torch.bmm(coef[s:s + k], x64).to(features.dtype).add_(rho_f[s:s + k] * w0f[s:s + k])
        logits = torch.bmm(gather_into(features, query[s:s + k], buf), w.transpose(1, 2), out=out[s:s + k])
        qs = out_scale[s:s + k].unsqueeze(1) * (inv[query[s:s + k]].unsqueeze(-1) if cosine else 1.0)
        logits.mul_(qs.to(features.dtype))
    if cfg.has_bias:
        out += (bias.t() * float(cfg.scale)).to(features.dtype).unsqueeze(1)
    return out
