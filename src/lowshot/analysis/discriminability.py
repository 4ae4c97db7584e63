"""Feature discriminability: class centres, inter/intra-class variance and their ratio phi.

Definition (Liu et al., "Negative Margin Matters", ECCV 2020, Sec. 4.1 "discriminability
function"), for N classes, I_j the samples of class j and mu_j their mean feature::

    D_inter = 1 / (N (N - 1)) * sum_{j != k} ||mu_j - mu_k||^2          (ordered pairs)
    D_intra = 1 / N * sum_j  1 / |I_j| * sum_{i in I_j} ||v_i - mu_j||^2
    phi     = D_inter / D_intra

Every class weighs the same in both terms whatever its size (a long-tailed split is not
dominated by its head classes). phi does not change when all features are scaled by a constant,
but it does change when each feature is L2-normalised; the paper does not say which space it
uses, so both are offered (``normalize``) and the tools report both (see docs/analysis.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError

@dataclass
class ClassStatistics:
    """Result of :func:`class_statistics` (float64 tensors on CPU)."""

    classes: Tensor  # (N,) label values present, ascending
    counts: Tensor  # (N,) samples per class
    centres: Tensor  # (N, D) class means mu_j
    intra_per_class: Tensor  # (N,) mean squared distance of each class's samples to its centre
    inter: float  # D_inter
    intra: float  # D_intra
    phi: float  # D_inter / D_intra (inf when every class collapses to one point)
    normalized: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, centres: bool = False) -> dict[str, Any]:
        """Plain data for JSON (centres are large: only on request)."""
        out: dict[str, Any] = {
            "phi": _finite(self.phi), "inter": self.inter, "intra": self.intra,
            "num_classes": int(self.classes.numel()), "num_samples": int(self.counts.sum()),
            "space": "l2" if self.normalized else "raw",
            "classes": self.classes.tolist(), "counts": self.counts.tolist(),
            "intra_per_class": self.intra_per_class.tolist(),
        }
        if centres:
            out["centres"] = self.centres.tolist()
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf


def class_statistics(features: Tensor, labels: Tensor, *, normalize: bool = False) -> ClassStatistics:
    """Class centres, D_inter, D_intra and phi = D_inter / D_intra (see module docstring).

    ``features`` [M, D], ``labels`` [M] (any integer values; only classes present count).
    ``normalize=True`` L2-normalises each feature first (the geometry a cosine head sees).
    Computed in float64 so phi is stable for large M.
    """
    f = torch.as_tensor(features)
    y = torch.as_tensor(labels).reshape(-1)
    if f.dim() != 2:
        raise DataError(f"class_statistics: features must be [N, D], got shape {tuple(f.shape)}")
    if y.numel() != f.shape[0]:
        raise DataError(f"class_statistics: {f.shape[0]} features but {y.numel()} labels")
    if y.is_floating_point():
        raise DataError("class_statistics: labels must be integers")
    f = f.detach().to("cpu", torch.float64)
    if not torch.isfinite(f).all():
        raise DataError("class_statistics: features contain NaN or Inf")
    if normalize:
        f = torch.nn.functional.normalize(f, dim=1)
    classes, index, counts = torch.unique(y.cpu().long(), return_inverse=True, return_counts=True)
    n = int(classes.numel())
    if n < 2:
        raise DataError(f"class_statistics needs at least 2 classes, got {n}")
    sums = torch.zeros(n, f.shape[1], dtype=torch.float64).index_add_(0, index, f)
    centres = sums / counts.unsqueeze(1).double()
    sq = ((f - centres[index]) ** 2).sum(dim=1)
    intra_per_class = torch.zeros(n, dtype=torch.float64).index_add_(0, index, sq) / counts.double()
    intra = float(intra_per_class.mean())
    # sum over ordered pairs ||mu_j - mu_k||^2 = 2 N sum_j ||mu_j - mean(mu)||^2 (no N x N matrix)
    spread = float(((centres - centres.mean(dim=0)) ** 2).sum())
    inter = 2.0 * n * spread / (n * (n - 1))
    phi = inter / intra if intra > 0 else math.inf
    return ClassStatistics(classes=classes, counts=counts, centres=centres, intra_per_class=intra_per_class,
                           inter=inter, intra=intra, phi=phi, normalized=normalize)


def headline_space(head_name: str) -> str:
    """The space whose phi is quoted first: the one the training head classifies in."""
    from ..heads import head_family
    return "l2" if head_family(head_name) == "cosine" else "raw"


def discriminability(features: Tensor, labels: Tensor, head_name: str | None = None) -> dict[str, Any]:
    """phi in both spaces plus the headline value: ``{"phi", "space", "raw": {...}, "l2": {...}}``."""
    raw = class_statistics(features, labels, normalize=False).to_dict()
    l2 = class_statistics(features, labels, normalize=True).to_dict()
    space = headline_space(head_name or "")
    return {"phi": raw["phi"] if space == "raw" else l2["phi"], "space": space, "raw": raw, "l2": l2}


# ----------------------------------------------------------------------------- 2-D projections

def pca_2d(features: Tensor) -> Tensor:
    """Exact PCA to 2-D (torch SVD of the centred data); signs fixed so the output is deterministic."""
    f = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise DataError(f"pca_2d needs at least 2 feature rows, got shape {tuple(f.shape)}")
    x = f - f.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:2]
    if comps.shape[0] < 2:  # 1-D features: pad a zero axis
        comps = torch.cat([comps, torch.zeros(1, x.shape[1], dtype=x.dtype)])
    big = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(comps.shape[0]), big])
    signs[signs == 0] = 1
    return (x @ (comps * signs.unsqueeze(1)).t()).float()


def tsne_2d(features: Tensor, seed: int = 0) -> Tensor:
    """t-SNE to 2-D with scikit-learn (optional dependency; PCA needs nothing)."""
    from ..utils import require
    TSNE = require("sklearn.manifold", "projection 'tsne' (use --projection pca otherwise)").TSNE
    f = torch.as_tensor(features).detach().cpu().double().numpy()
    perplexity = float(min(30.0, max(2.0, (f.shape[0] - 1) / 3)))
    out = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(f)
    return torch.as_tensor(out, dtype=torch.float32)


def project_2d(features: Tensor, method: str = "pca", seed: int = 0) -> Tensor:
    if method == "pca":
        return pca_2d(features)
    if method == "tsne":
        return tsne_2d(features, seed)
    raise ConfigError(f"unknown projection {method!r} (known: pca, tsne)")
