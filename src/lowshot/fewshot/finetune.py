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
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .basis import gather_rows, sub_chunk_size, support_basis

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
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"finetune {name} must be an integer >= 0, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"finetune batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"finetune {name} must be >= 0, got {getattr(self, name)!r}")
        if self.scale is None:
            object.__setattr__(self, "scale", 5.0 if self.head == "cosine" else 1.0)
        if not float(self.scale) > 0:
            raise ConfigError(f"finetune scale must be > 0, got {self.scale!r}")

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
    perms: Tensor    # [E, passes, n] int64 support order of each pass


def _mix(seed: int, block: int) -> int:
    """splitmix64 of (seed, block): independent, platform-free generator seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _shuffles(u: Tensor, n: int) -> Tensor:
    """Fisher-Yates permutations of ``range(n)``, one per row of uniforms ``u`` [R, n-1]."""
    rows = u.shape[0]
    perm = torch.arange(n).unsqueeze(1).repeat(1, rows)             # [n, R]: column ops contiguous
    for i in range(n - 1, 0, -1):
        j = (u[:, i - 1] * (i + 1)).long().clamp_(max=i).unsqueeze(0)
        vi = perm[i].clone()
        perm[i] = perm.gather(0, j).squeeze(0)
        perm.scatter_(0, j, vi.unsqueeze(0))
    return perm.t().contiguous()


def episode_draws(seed: int, start: int, stop: int, way: int, dim: int, n_support: int,
                  passes: int) -> Draws:
    """Initial head and shuffles of episodes ``start..stop-1`` (same for any chunking)."""
    bound = 1.0 / math.sqrt(dim)
    ws, bs, us = [], [], []
    first = start // _RNG_BLOCK
    for block in range(first, (stop - 1) // _RNG_BLOCK + 1):
        gen = torch.Generator().manual_seed(_mix(seed, block))
        ws.append(torch.empty(_RNG_BLOCK, way, dim).uniform_(-bound, bound, generator=gen))
        bs.append(torch.empty(_RNG_BLOCK, way).uniform_(-bound, bound, generator=gen))
        us.append(torch.rand(_RNG_BLOCK, passes, max(n_support - 1, 0), generator=gen,
                             dtype=torch.float64))
    lo, hi = start - first * _RNG_BLOCK, stop - first * _RNG_BLOCK
    u = torch.cat(us)[lo:hi]
    perms = _shuffles(u.reshape(-1, u.shape[-1]), n_support).view(hi - lo, passes, n_support)
    return Draws(torch.cat(ws)[lo:hi], torch.cat(bs)[lo:hi], perms)


def _solve(cfg: FinetuneConfig, A: Tensor, bias: Tensor, coords: Tensor, perms: Tensor,
           shot: int, steps: int) -> None:
    """Run the SGD trajectory in place on coordinates ``A`` [E, way, k] (and ``bias`` [E, way]).

    ``coords`` [E, n, k] are the support coordinates.  Updates follow torch.optim.SGD exactly:
    ``g = grad + wd * p``; ``buf = g`` on the first step, else ``buf = mom * buf + (1 - damp) * g``;
    ``p -= lr * buf``.  Every op is per-episode (bmm / row-wise), so episodes never interact.
    """
    e, way, k = A.shape
    n = coords.shape[1]
    bsz, lr, mom, wd = cfg.batch_size, float(cfg.lr), float(cfg.momentum), float(cfg.weight_decay)
    scale, cosine, use_bias = float(cfg.scale), cfg.head == "cosine", cfg.has_bias
    per_pass = math.ceil(n / bsz)
    flat = coords.reshape(e * n, k)
    base = (torch.arange(e, device=A.device) * n).unsqueeze(1)
    classes = torch.arange(way, device=A.device, dtype=torch.int64)
    buf = torch.zeros_like(A)
    bbuf = torch.zeros_like(bias)
    xp = yp = A  # set at each pass start
    for t in range(steps):
        p, j = divmod(t, per_pass)
        if j == 0:
            order = perms[:, p].to(A.device)
            xp = flat.index_select(0, (order + base).reshape(-1)).view(e, n, k)
            yp = ((order // shot).unsqueeze(-1) == classes).to(A.dtype)
        lo, hi = j * bsz, min(n, (j + 1) * bsz)
        xb, yb, b = xp[:, lo:hi], yp[:, lo:hi], hi - lo
        first = t == 0
        c = 1.0 if (first or mom == 0) else 1.0 - float(cfg.dampening)
        m = 0.0 if first else mom
        num = torch.bmm(xb, A.transpose(1, 2))                      # [e, b, way]
        if cosine:
            inv = torch.linalg.vector_norm(A, dim=-1).reciprocal_()  # 1/|w_c|
            logits = num * (inv * scale).unsqueeze(1)
        else:
            logits = (num + bias.unsqueeze(1)) if use_bias else num
            logits = logits * scale if scale != 1.0 else logits.clone()
        logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        prob = logits.div_(logits.sum(-1, keepdim=True))
        grad_logit = prob.sub_(yb).mul_(scale / b)                    # dL/d(logit / scale)
        if cosine:
            # d cos_bc / d w_c = x_b/|w_c| - cos_bc w_c/|w_c|^2  (with cos = num/|w|)
            dot = (grad_logit * num).sum(1)                            # [e, way]
            coef = (wd - dot * inv * inv * inv) * c
            gamma = grad_logit.mul_((inv * c).unsqueeze(1))
        else:
            if use_bias:
                gb = grad_logit.sum(1).add_(bias, alpha=wd).mul_(c)
                bbuf = gb if first else gb.add_(bbuf, alpha=m)
                bias.add_(bbuf, alpha=-lr)
            gamma = grad_logit.mul_(c)
            coef = None
        new = torch.bmm(gamma.transpose(1, 2), xb)                    # [e, way, k]
        buf = new if first else new.add_(buf, alpha=m)
        if coef is None:
            buf.add_(A, alpha=wd * c)
        else:
            buf.addcmul_(A, coef.unsqueeze(-1))
        A.add_(buf, alpha=-lr)


def finetune_scores(cfg: FinetuneConfig, features: Tensor, episodes: Tensor, shot: int,
                    seed: int, start: int = 0, solve_dtype: torch.dtype = torch.float64) -> Tensor:
    """Query logits ``[E, way * query, way]`` for one chunk of episodes (batched, exact)."""
    e, way, m = episodes.shape
    n, dim, dev = way * shot, features.shape[1], features.device
    steps = cfg.num_steps(n, shot)
    passes = max(1, math.ceil(steps / math.ceil(n / cfg.batch_size)))
    draws = episode_draws(seed, start, start + e, way, dim, n, passes)
    w0 = draws.weight.to(dev)
    feats = F.normalize(features, dim=-1) if cfg.head == "cosine" else features
    support = episodes[:, :, :shot].reshape(e, n).to(dev)
    f64 = torch.float64
    gram = torch.empty(e, n, n, dtype=f64, device=dev)
    cross = torch.empty(e, way, n, dtype=f64, device=dev)
    sub = sub_chunk_size(n + way, dim)
    for s in range(0, e, sub):
        x = gather_rows(feats, support[s:s + sub], f64)
        w = w0[s:s + sub].to(f64)
        gram[s:s + sub] = torch.bmm(x, x.transpose(1, 2))
        cross[s:s + sub] = torch.bmm(w, x.transpose(1, 2))
    coords, transform = support_basis(gram)
    a0 = torch.bmm(cross, transform.transpose(1, 2))                  # [e, way, n]
    w0n2 = w0.to(f64).pow(2).sum(-1)
    res2 = (w0n2 - a0.pow(2).sum(-1)).clamp_min(0)
    has_res = res2 > 1e-12 * w0n2
    beta0 = torch.where(has_res, res2.sqrt(), torch.zeros_like(res2))
    A = torch.cat([a0, beta0.unsqueeze(-1)], -1).to(solve_dtype)
    xc = F.pad(coords, (0, 1)).to(solve_dtype)
    bias = draws.bias.to(dev, solve_dtype) if cfg.has_bias else torch.zeros(e, way, dtype=solve_dtype, device=dev)
    _solve(cfg, A, bias, xc, draws.perms, shot, steps)
    A = A.to(f64)
    # Back to feature space: W = (A_r - rho a0) T X + rho W0, with rho = beta / beta0.
    rho = torch.where(has_res, A[..., -1] / beta0.clamp_min(1e-300), torch.zeros_like(beta0))
    coef = torch.bmm(A[..., :n] - rho.unsqueeze(-1) * a0, transform)  # [e, way, n]
    if cfg.head == "cosine":
        out_scale = float(cfg.scale) / torch.linalg.vector_norm(A, dim=-1)
        shift = None
    else:
        out_scale = torch.full((e, way), float(cfg.scale), dtype=f64, device=dev)
        shift = bias.to(f64) if cfg.has_bias else None
    query = episodes[:, :, shot:].reshape(e, -1).to(dev)
    out = torch.empty(e, query.shape[1], way, dtype=features.dtype, device=dev)
    sub = sub_chunk_size(query.shape[1] + n, dim)
    for s in range(0, e, sub):
        x = gather_rows(feats, support[s:s + sub], f64)
        w = torch.bmm(coef[s:s + sub], x) + rho[s:s + sub].unsqueeze(-1) * w0[s:s + sub].to(f64)
        w = w * out_scale[s:s + sub].unsqueeze(-1)
        q = gather_rows(feats, query[s:s + sub])
        logits = torch.bmm(q, w.to(features.dtype).transpose(1, 2))
        if shift is not None:
            logits += (shift[s:s + sub] * float(cfg.scale)).to(features.dtype).unsqueeze(1)
        out[s:s + sub] = logits
    return out


def with_overrides(cfg: FinetuneConfig, **kw: object) -> FinetuneConfig:
    return replace(cfg, **kw)
