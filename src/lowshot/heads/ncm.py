"""Nearest-class-mean head: the NCM classifier of Kang et al. (ICLR 2020) as a regular head.

Holding the class means as ``.weight`` makes an NCM classifier an ordinary checkpoint entry:
``model_from_checkpoint`` rebuilds it, ``lowshot embed`` / ``eval`` use it unchanged. Features
are centred by the ``center`` buffer and L2-normalised (q = normalize(x - center)), then

* ``metric="l2"``: logit_j = -||q - mu_j||^2;
* ``metric="cosine"``: logit_j = q . mu_j with the class means NOT re-normalised, as in the
  official code (facebookresearch/classifier-balancing models/KNNClassifier.py:54-55 leave the
  centroid normalisation commented out; ``cos_similarity`` :77-81 is ``q . mu_j / feat_dim``,
  whose constant 1 / feat_dim changes no prediction and is left out here).

``fit(features, labels, center=...)`` sets ``weight`` to the class means of the centred,
normalised training features and ``center`` to

* ``"all"`` (default, the official one): the mean of ALL training features
  (run_networks.py ``get_knncentroids``: ``featmean = feats.mean(axis=0)``, the ``cl2n`` centre);
* ``"class_mean"``: the mean of the per-class means, which a long-tailed set's head classes do
  not dominate (lowshot's earlier default);
* ``"none"``: no centring (the official ``l2n`` features). ``True`` / ``False`` mean ``"all"`` /
  ``"none"``.

The head has no margin; it is differentiable in both ``x`` and ``weight`` so it can also be
fine-tuned like a prototype layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .registry import Head, register_head

NCM_METRICS = ("l2", "cosine")
NCM_CENTERS = ("all", "class_mean", "none")


def resolve_center(center: str | bool) -> str:
    """``"all"`` | ``"class_mean"`` | ``"none"`` from a name or a bool (True = the official "all")."""
    if isinstance(center, bool):
        return "all" if center else "none"
    if center not in NCM_CENTERS:
        raise ConfigError(f"NCM center must be one of {NCM_CENTERS} (or true/false), got {center!r}")
    return center


def ncm_center(features: torch.Tensor, class_means: torch.Tensor, center: str | bool) -> torch.Tensor:
    """The centre [D] subtracted before normalising (see the module docstring)."""
    mode = resolve_center(center)
    if mode == "all":
        return features.mean(dim=0)
    if mode == "class_mean":
        return class_means.mean(dim=0)
    return torch.zeros(features.shape[1], dtype=features.dtype, device=features.device)


def ncm_fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
            center: str | bool = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """``(means [C, D], center [D])``: class means of centred, L2-normalised training features.

    ``center="all"`` (default) is the official centre, the mean of ALL training features
    (classifier-balancing run_networks.py ``get_knncentroids``: ``featmean = feats.mean(axis=0)``);
    ``"class_mean"`` the mean of the per-class means; ``"none"`` (or False) does not centre. The
    means are never re-normalised, also for ``cosine``, as in the official KNNClassifier.py:54-55.
    Every class needs a training feature.
    """
    f = torch.as_tensor(features)
    f = f if f.is_floating_point() else f.float()
    y = torch.as_tensor(labels).reshape(-1).long().to(f.device)
    if f.dim() != 2 or y.numel() != f.shape[0] or y.numel() == 0:
        raise DataError(f"NCM: fit needs features (N, D) and N >= 1 labels, got {tuple(f.shape)} and {y.numel()}")
    C = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise DataError(f"NCM: fit labels must lie in 0..{C - 1}, got {int(y.min())}..{int(y.max())}")
    counts = torch.bincount(y, minlength=C)
    empty = torch.nonzero(counts == 0).reshape(-1)
    if empty.numel():
        raise DataError(f"NCM: class {int(empty[0])} has no training features")

    def class_means(x: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(C, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
        return sums / counts.to(x)[:, None]

    mu = ncm_center(f, class_means(f), center)
    return class_means(F.normalize(f - mu, dim=1)), mu


def ncm_logits(
    features: torch.Tensor, means: torch.Tensor, center: torch.Tensor, metric: str = "l2"
) -> torch.Tensor:
    """Scores [N, C] (higher is closer) of centred, L2-normalised features against class means:
    ``-||q - mu_j||^2`` (``l2``) or the official ``q . mu_j`` (``cosine``, KNNClassifier.py:77-81)."""
    if metric not in NCM_METRICS:
        raise ConfigError(f"NCM metric must be one of {NCM_METRICS}, got {metric!r}")
    q = F.normalize(features.to(means) - center.to(means), dim=1)
    if metric == "cosine":  # the official "cos": class means as stored, not re-normalised
        return q @ means.t()
    # -||q - mu||^2 expanded: one matmul instead of an [N, C, D] difference tensor
    return 2.0 * q @ means.t() - (q * q).sum(1, keepdim=True) - (means * means).sum(1)[None, :]


class NCMHead(Head):
    """logits = -||normalize(x - center) - mu_j||^2 (``l2``) or normalize(x - center) . mu_j (``cosine``)."""

    head_name = "ncm"

    def __init__(self, num_classes: int, embedding_size: int, metric: str = "l2") -> None:
        if metric not in NCM_METRICS:
            raise ConfigError(f"head 'ncm': metric must be one of {NCM_METRICS}, got {metric!r}")
        super().__init__(num_classes, embedding_size, bias=False)
        self.metric = metric
        self.register_buffer("center", torch.zeros(embedding_size))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check(features, labels)
        return ncm_logits(features, self.weight, self.center.to(features.dtype), self.metric)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, center: str | bool = "all") -> NCMHead:
        """Set ``center`` and the class means from training features; every class needs one."""
        f = torch.as_tensor(features).to(self.weight)
        if f.dim() != 2 or f.shape[1] != self.embedding_size:
            raise DataError(f"head 'ncm': fit needs features (N, {self.embedding_size}), got {tuple(f.shape)}")
        means, mu = ncm_fit(f, labels, self.num_classes, center)
        self.center.copy_(mu)
        self.weight.copy_(means)
        return self

    def score_form(self) -> dict[str, Any]:
        return {"kind": "ncm", "weight": self.weight.detach(), "scale": 1.0, "center": self.center.detach(),
                "metric": self.metric}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, metric={self.metric!r}"


@register_head("ncm", "nearest_class_mean")
def ncm(num_classes: int, embedding_size: int, metric: str = "l2") -> NCMHead:
    """NCM head; call ``fit`` (or load a checkpoint) to set the class means and centre."""
    return NCMHead(num_classes, embedding_size, metric)
