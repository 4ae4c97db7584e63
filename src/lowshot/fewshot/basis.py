"""Orthonormal coordinates for the span of each episode's support set.

Fine-tuning a linear/cosine head with SGD (momentum, weight decay) and L2 logistic regression
both keep the weights inside span(initial weights, support features): every gradient of the
loss w.r.t. a weight row is a combination of support features, and weight decay and momentum
only rescale and add such vectors.  Working in an orthonormal basis of the support span
(``n = way * shot`` dims instead of ``D``) is therefore *exact*, and inner products/norms
are plain dot products of coordinates.  The basis is never formed: with support matrix
``X`` (n x D) and Gram matrix ``G = X X^T``, we build a map ``T`` (n x n) such that
``Q^T = T X`` has orthonormal rows; coordinates of any vector ``v`` are ``T (X v)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Cholesky is used when the support is comfortably full-rank; otherwise (duplicates, zero
# features, D < n) an eigendecomposition drops directions with tiny eigenvalues.
_CHOL_RTOL = 1e-10
_EIG_RTOL = 1e-12
GATHER_BUDGET = 1 << 18   # floats per block of gathered feature rows (stays in cache)


def support_basis(gram: Tensor, transform: bool = True) -> tuple[Tensor, Tensor | None]:
    """From Gram matrices ``[E, n, n]`` (float64) return ``(coords, T)``, both ``[E, n, n]``.

    ``coords[e, j]`` are the coordinates of support sample ``j``; ``T[e]`` maps products with
    the support (``X v``) to coordinates.  Rank-deficient episodes get zero columns for the
    missing directions, which is exact because no support vector has a component there.
    ``transform=False`` skips ``T`` (returned as None): a solver that maps its result back
    through the support rows themselves (logreg's KKT weights) never needs it.
    """
    e, n, _ = gram.shape
    chol, info = torch.linalg.cholesky_ex(gram)
    diag = chol.diagonal(dim1=-2, dim2=-1)
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    ok = (info == 0) & ((diag * diag).amin(-1) > _CHOL_RTOL * scale)
    coords = torch.where(ok[:, None, None], chol, torch.zeros((), dtype=gram.dtype, device=gram.device))
    out = None
    if transform:
        eye = torch.eye(n, dtype=gram.dtype, device=gram.device).expand(e, n, n)
        safe = torch.where(ok[:, None, None], chol, eye)
        # A contiguous right-hand side: with the stride-0 expanded identity, batched CPU
        # solve_triangular is ~1000x slower at n = 25 (torch 2.x), identical results.
        out = torch.linalg.solve_triangular(safe, eye.contiguous(), upper=False)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        lam, vec = torch.linalg.eigh(gram[bad])
        keep = lam > _EIG_RTOL * lam.amax(-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
        root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
        inv_root = torch.where(keep, 1.0 / root.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(lam))
        coords[bad] = vec * root.unsqueeze(-2)
        if out is not None:
            out[bad] = inv_root.unsqueeze(-1) * vec.transpose(-1, -2)
    return coords, out


def inverse_norms(features: Tensor) -> Tensor:
    """``1 / max(|x_i|, 1e-12)`` per row in float64 (``F.normalize``'s rule).

    Scaling Gram matrices, coefficients and logits by these is the same as normalising the
    rows, without writing a normalised copy of every gathered row.
    """
    norms = torch.linalg.vector_norm(features, dim=1)    # features' precision, like F.normalize
    return norms.to(torch.float64).clamp_min(1e-12).reciprocal()


def gather_into(table: Tensor, index: Tensor, buf: Tensor) -> Tensor:
    """``table[index]`` written into the reusable ``buf`` (rows >= index.numel()).

    The batched evaluators gather blocks of rows in a loop; a fresh multi-MB tensor per block
    costs a page fault per 4 KB (gathers ran at 1 GB/s instead of 10 GB/s), a reused one none.
    """
    flat = index.reshape(-1)
    out = buf[:flat.numel()]
    torch.index_select(table, 0, flat, out=out)
    return out.view(*index.shape, table.shape[1])
