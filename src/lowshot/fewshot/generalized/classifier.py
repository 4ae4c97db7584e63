"""The base classifier in linear form, and the novel rows an episode adds (imprint / fine-tune / NCM)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, DataError
from ..api import as_feature_tensor
from ..episodes import as_label_tensor
from ..finetune import FinetuneConfig

from .constants import KINDS, METHODS

# ----------------------------------------------------------------------------- the base classifier

@dataclass(frozen=True)
class BaseClassifier:
    """The base classifier in linear form: ``score_j = scale * (phi(x) . w_j + b_j)``.

    ``kind="cosine"``: phi(x) = x / |x|, rows normalised (cosine / arcface heads);
    ``kind="linear"``: phi(x) = x, raw rows and bias (linear / neg_softmax / virtual_softmax);
    ``kind="ncm"``: phi(x) = normalize(x - center), rows = class means of phi over the base
    training images, cosine metric (rows normalised) or ``metric="l2"`` (``2 mu`` and bias
    ``-|mu|^2``, i.e. ``-|phi(x) - mu|^2`` up to a constant per query).
    """

    weight: Tensor
    kind: str = "cosine"
    scale: float = 1.0
    bias: Tensor | None = None
    center: Tensor | None = None
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"base classifier kind must be one of {KINDS}, got {self.kind!r}")
        w = torch.as_tensor(self.weight)
        if w.dim() != 2 or w.shape[0] < 1:
            raise DataError(f"base classifier weight must be [classes, dims], got shape {tuple(w.shape)}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"base classifier scale must be a finite number > 0, got {self.scale!r}")
        if self.bias is not None and torch.as_tensor(self.bias).shape != (w.shape[0],):
            raise DataError(f"base classifier bias must have {w.shape[0]} values, got {tuple(self.bias.shape)}")
        if self.kind == "ncm" and self.metric not in ("cosine", "l2"):
            raise ConfigError(f"ncm metric must be 'cosine' or 'l2', got {self.metric!r}")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_head(cls, head: torch.nn.Module) -> BaseClassifier:
        """The trained head of a checkpoint as a base classifier (margins are training-only)."""
        try:
            form = head.score_form()   # each head states its eval logits (lowshot.heads.Head.score_form)
        except (AttributeError, ConfigError):
            raise ConfigError(f"generalized few-shot needs the head's eval logits in linear form, which head "
                              f"{getattr(head, 'head_name', type(head).__name__)!r} does not give "
                              f"(Head.score_form); use method=ncm with base training features") from None
        tensors = {k: None if v is None else v.detach().float().cpu()
                   for k, v in form.items() if k in ("weight", "bias", "center")}
        return cls(tensors["weight"], form["kind"], float(form.get("scale", 1.0)), tensors.get("bias"),
                   tensors.get("center"), form.get("metric", "cosine"))

    @classmethod
    def ncm(cls, features: Any, labels: Any, metric: str = "cosine") -> BaseClassifier:
        """NCM over base training features (``heads.ncm.NCMHead.fit``: centre = mean class mean)."""
        from ...heads.ncm import NCMHead
        x = as_feature_tensor(features)
        y = as_label_tensor(labels)
        if y.numel() != x.shape[0]:
            raise DataError(f"{x.shape[0]} base training feature rows but {y.numel()} labels")
        head = NCMHead(int(y.max()) + 1, x.shape[1], metric).to(x.dtype).fit(x, y)
        return cls(head.weight.detach(), "ncm", 1.0, center=head.center.detach(), metric=metric)

    def project(self, x: Tensor) -> Tensor:
        """phi(x): the features the rows are dotted with."""
        if self.kind == "cosine":
            return F.normalize(x, dim=-1)
        if self.kind == "ncm":
            return F.normalize(x - self.center.to(x), dim=-1)
        return x

    def rows(self, dtype: torch.dtype, device: Any) -> tuple[Tensor, Tensor]:
        """``(W [C, D], b [C])`` of the linear form."""
        w = self.weight.to(device, dtype)
        zeros = torch.zeros(w.shape[0], dtype=dtype, device=device)
        if self.kind == "cosine" or (self.kind == "ncm" and self.metric == "cosine"):
            return F.normalize(w, dim=1), zeros
        if self.kind == "ncm":
            return 2 * w, -w.square().sum(1)
        return w, (zeros if self.bias is None else self.bias.to(device, dtype))


def _method_for(clf: BaseClassifier, method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"generalized method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return {"cosine": "imprint", "linear": "finetune", "ncm": "ncm"}[clf.kind]
    if (method == "ncm") != (clf.kind == "ncm"):
        raise ConfigError(f"method {method!r} does not fit a {clf.kind!r} base classifier "
                          f"(ncm needs the NCM base classifier over base training features)")
    return method


# ----------------------------------------------------------------------------- novel weights

def _imprint(clf: BaseClassifier, support: Tensor, base_w: Tensor, base_b: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised mean of the normalised support; linear kind: at the mean base-row norm and bias."""
    mean = F.normalize(F.normalize(support, dim=-1).mean(2), dim=-1)                 # [e, way, D]
    if clf.kind == "linear":
        return mean * base_w.norm(dim=1).mean(), base_b.mean().expand(mean.shape[:2]).clone()
    return mean, torch.zeros(mean.shape[:2], dtype=mean.dtype, device=mean.device)


def _ncm_rows(clf: BaseClassifier, support: Tensor) -> tuple[Tensor, Tensor]:
    """Support means of phi(x) (already projected) in the NCM base classifier's form."""
    mu = support.mean(2)
    if clf.metric == "cosine":
        return F.normalize(mu, dim=-1), torch.zeros(mu.shape[:2], dtype=mu.dtype, device=mu.device)
    return 2 * mu, -mu.square().sum(-1)


def finetune_novel_rows(cfg: FinetuneConfig, clf: BaseClassifier, base_w: Tensor, base_b: Tensor,
                        support: Tensor, w0: Tensor, b0: Tensor, perms: Tensor, shot: int) -> tuple[Tensor, Tensor]:
    """Fine-tune only the novel rows ``w0`` [e, way, D] (and biases, linear kind) in the joint space.

    ``support`` [e, way * shot, D] holds projected features in class-major order. Every episode
    runs ``cfg``'s schedule with its own support order (``perms`` [e, passes, n] from
    ``finetune.episode_draws``): mini-batches of ``cfg.batch_size``, mean cross-entropy over the
    C + way joint classes with the base rows frozen. The update is ``torch.optim.SGD``'s
    (``g = grad + wd p``; ``buf = g`` first, then ``mom buf + (1 - damp) g``; ``p -= lr buf``),
    written out because it is elementwise: one tensor holding all episodes equals one optimizer
    per episode (and torch.optim's first use imports torch._dynamo, seconds on a busy CPU).
    """
    e, n, _ = support.shape
    way = w0.shape[1]
    num_base = base_w.shape[0]
    steps = cfg.num_steps(n, shot)
    per_pass = math.ceil(n / cfg.batch_size)
    cosine = clf.kind == "cosine"
    lr, mom, damp, wd = float(cfg.lr), float(cfg.momentum), float(cfg.dampening), float(cfg.weight_decay)
    params = [w0.clone().requires_grad_(True)] + ([] if cosine else [b0.clone().requires_grad_(True)])
    bufs: list[Tensor | None] = [None] * len(params)
    labels = torch.arange(way, device=support.device).repeat_interleave(shot) + num_base
    scale = float(clf.scale)
    for t in range(steps):
        p, j = divmod(t, per_pass)
        idx = perms[:, p, j * cfg.batch_size:(j + 1) * cfg.batch_size].to(support.device, torch.int64)
        xb = support.gather(1, idx.unsqueeze(-1).expand(-1, -1, support.shape[2]))   # [e, b, D]
        yb = labels[idx]                                                              # [e, b]
        base_logits = xb @ base_w.t() + base_b
        w = params[0]
        if cosine:
            novel_logits = torch.bmm(xb, F.normalize(w, dim=-1).transpose(1, 2))
        else:
            novel_logits = torch.bmm(xb, w.transpose(1, 2)) + params[1].unsqueeze(1)
        logits = scale * torch.cat([base_logits, novel_logits], -1)
        loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(e, -1).mean(1).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (prm, g) in enumerate(zip(params, grads)):
                g = g.add(prm, alpha=wd) if wd else g
                if mom:
                    bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(mom).add_(g, alpha=1 - damp)
                    g = bufs[i]
                prm.sub_(g, alpha=lr)
    w = params[0].detach()
    b = b0.clone() if cosine else params[1].detach()
    return (F.normalize(w, dim=-1) if cosine else w), b
