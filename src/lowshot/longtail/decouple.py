"""Stage-2 classifiers of "Decoupling Representation and Classifier" (Kang et al., ICLR 2020).

Stage 1 trains backbone + linear classifier jointly (usually instance-balanced). Stage 2 keeps the
representation and only rebalances the classifier:

* tau-normalisation: w_i <- w_i / ||w_i||^tau, bias dropped (no training). The official code sweeps
  tau on the *test* set; ``select_tau`` picks it on a balanced validation split instead;
* LWS (learnable weight scaling): logits = s_i * (w_i . f + b_i), only s trained, class-balanced;
* cRT (classifier re-training): re-initialise the linear classifier and train it with
  class-balanced sampling on frozen features;
* cRT and LWS train like the official loop by default: a per-epoch cosine whose last epoch runs
  at lr 0 (``stage2_lr``) and the epoch with the best balanced-val top-1 kept (``_BestEpoch``);
  ``schedule="step"`` / no validation data give a per-step cosine and the final epoch;
* NCM is the ``ncm`` head (``lowshot.heads.ncm``: ``ncm_fit`` / ``ncm_logits``), fitted by the
  stage-2 ``ncm`` method.

Everything here takes tensors / modules explicitly and is deterministic in ``seed``. Features are
float tensors [N, D]. Because the backbone is frozen, LWS and ``retrain_crt`` train on cached
features (fast, but without data augmentation, which cannot be applied to cached features);
``retrain_crt_on_images`` runs the frozen backbone on augmented batches when augmentation matters.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..data.samplers import build_sampler

DEFAULT_TAU_GRID: tuple[float, ...] = tuple(round(0.1 * i, 10) for i in range(21))  # 0, 0.1, ..., 2


def _check_features(features: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.as_tensor(features)
    if f.dim() != 2:
        raise DataError(f"{what} features must be [N, D], got shape {tuple(f.shape)}")
    if not f.is_floating_point():
        f = f.float()
    lab = torch.as_tensor(labels).reshape(-1).long().to(f.device)
    if lab.numel() != f.shape[0]:
        raise DataError(f"{what}: {f.shape[0]} feature rows but {lab.numel()} labels")
    if lab.numel() == 0:
        raise DataError(f"{what}: no samples")
    return f, lab


# --- tau-normalisation ----------------------------------------------------------------------------
def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_i / ||w_i||^tau for every class row (tau = 0: unchanged, tau = 1: unit norms)."""
    w = weight.detach()
    norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return w / norms.pow(float(tau))


def _correct_per_class(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                       num_classes: int, batch_size: int) -> torch.Tensor:
    correct = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
    for f, y in zip(features.split(batch_size), labels.split(batch_size)):
        hit = (f @ weight.t()).argmax(dim=1) == y
        correct += torch.bincount(y[hit], minlength=num_classes)
    return correct


def select_tau(weight: torch.Tensor, val_features: torch.Tensor, val_labels: torch.Tensor,
               grid: Sequence[float] | None = None, *, criterion: str = "accuracy",
               batch_size: int = 4096) -> tuple[float, list[tuple[float, float]]]:
    """Pick tau on a (balanced) validation split: ``(best_tau, [(tau, accuracy %), ...])``.

    ``criterion="accuracy"`` is overall accuracy (on a balanced split the same as class-mean
    accuracy); use ``"class_mean"`` for an imbalanced validation set. Ties go to the SMALLEST tau,
    the least change to the jointly trained classifier. Default grid: 0, 0.1, ..., 2.0.
    """
    if criterion not in ("accuracy", "class_mean"):
        raise ConfigError(f"select_tau: criterion must be 'accuracy' or 'class_mean', got {criterion!r}")
    f, y = _check_features(val_features, val_labels, "validation")
    w = weight.detach().to(device=f.device, dtype=f.dtype)
    C = int(w.shape[0])
    if int(y.max()) >= C:
        raise DataError(f"validation label {int(y.max())} out of range for a {C}-class classifier")
    taus = list(DEFAULT_TAU_GRID if grid is None else grid)
    if not taus:
        raise ConfigError("select_tau: empty tau grid")
    n_per_class = torch.bincount(y, minlength=C)
    present = n_per_class > 0
    curve: list[tuple[float, float]] = []
    best_key: Any = None
    best_tau = float(taus[0])
    for tau in sorted(float(t) for t in taus):
        correct = _correct_per_class(tau_normalize(w, tau), f, y, C, batch_size)
        acc = 100.0 * int(correct.sum()) / y.numel()
        if criterion == "accuracy":
            key: Any = int(correct.sum())  # exact integer comparison: ties are real ties
            score = acc
        else:
            score = float((100.0 * correct[present].double() / n_per_class[present].double()).mean())
            key = round(score, 9)
        curve.append((tau, acc if criterion == "accuracy" else score))
        if best_key is None or key > best_key:  # strict: the first (smallest) tau wins ties
            best_key, best_tau = key, tau
    if len(taus) > 1 and best_tau == max(taus) and curve[-1][1] > curve[-2][1]:
        warnings.warn(f"select_tau: best tau {best_tau} is the largest in the grid and accuracy was still "
                      f"rising; consider a wider grid", stacklevel=2)
    return best_tau, curve


# --- shared SGD loop on cached features ------------------------------------------------------------
def _make_sampler(sampler: str, labels: torch.Tensor, seed: int, num_classes: int,
                  sampler_kw: dict[str, Any] | None, epochs: int) -> Any:
    kw = dict(sampler_kw or {})  # the stage-2 schedule is the natural horizon
    return build_sampler(sampler, labels.cpu(), seed=seed, num_classes=num_classes, horizon=epochs, **kw)


def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(total, 1)))


SCHEDULES = ("epoch", "step")
SELECTIONS = ("best_val", "last")


def stage2_lr(base: float, schedule: str, epoch: int, epochs: int, step: int, total: int) -> float:
    """Learning rate of a stage-2 step (``epoch`` 0-based, ``step`` global, ``total`` steps).

    ``"epoch"`` is the official schedule: ``CosineAnnealingLR(T_max=num_epochs, eta_min=endlr)``
    (classifier-balancing run_networks.py:157-160, ``endlr: 0.0`` in config/ImageNet_LT/cls_crt.yaml)
    stepped at the START of every epoch (run_networks.py:255), so epoch i runs at the constant
    ``base * (1 + cos(pi (i + 1) / epochs)) / 2`` and the last epoch at lr 0. ``"step"`` decays
    per step from ``base`` to 0 over the whole run.
    """
    if schedule == "epoch":
        return 0.5 * base * (1.0 + math.cos(math.pi * (epoch + 1) / max(epochs, 1)))
    if schedule == "step":
        return _cosine_lr(base, step, total)
    raise ConfigError(f"stage-2 schedule must be one of {SCHEDULES}, got {schedule!r}")


class _BestEpoch:
    """Keeps the tensors (and module states) of the epoch with the best validation top-1.

    The official loop evaluates on val after every epoch and keeps the strictly best epoch
    (run_networks.py:356-362, ``if self.eval_acc_mic_top1 > best_acc``; first best wins), which
    is what it saves and tests (:373). ``score`` None keeps the last epoch.
    """

    def __init__(self, tensors: list[torch.Tensor], score: Callable[[], float] | None,
                 modules: Sequence[nn.Module] = (), record: dict[str, Any] | None = None) -> None:
        self.tensors, self.score, self.modules = tensors, score, list(modules)
        self.record = record if record is not None else {}
        self.record.update(select="best_val" if score is not None else "last", val_curve=[], lrs=[])
        self.best: float | None = None
        self.saved: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]] | None = None

    def after_epoch(self, epoch: int, lr: float) -> None:
        self.record["lrs"].append(lr)
        if self.score is None:
            return
        value = float(self.score())
        self.record["val_curve"].append(value)
        if self.best is None or value > self.best:
            self.best = value
            self.record["best_epoch"] = epoch + 1
            self.saved = ([t.detach().clone() for t in self.tensors],
                          [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules])

    def restore(self) -> None:
        if self.saved is None:
            return
        with torch.no_grad():
            for t, v in zip(self.tensors, self.saved[0]):
                t.copy_(v)
        for m, state in zip(self.modules, self.saved[1]):
            m.load_state_dict(state)


def _top1(logits_fn: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
          labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([logits_fn(f).argmax(1) for f in features.split(8192)])
    return 100.0 * float((pred == labels).double().mean())


def _fit(params: list[torch.Tensor], logits_fn: Callable[[torch.Tensor], torch.Tensor],
         features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int, lr: float,
         batch_size: int, momentum: float, weight_decay: float, sampler: str,
         sampler_kw: dict[str, Any] | None, seed: int, schedule: str = "epoch",
         val: tuple[torch.Tensor, torch.Tensor] | None = None, record: dict[str, Any] | None = None) -> None:
    """SGD with momentum over sampler epochs, cosine-decayed to 0 (``stage2_lr``: per epoch as the
    official code, or per step); with ``val`` the best-val epoch's parameters are kept (official)."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    stage2_lr(lr, schedule, 0, epochs, 0, 1)  # validates the name before any work
    smp = _make_sampler(sampler, labels, seed, num_classes, sampler_kw, epochs)
    steps = math.ceil(len(smp) / batch_size)
    total = epochs * steps
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    keeper = _BestEpoch(params, None if val is None else (lambda: _top1(logits_fn, *val)), record=record)
    step = 0
    from ..utils import progress
    for epoch in progress(range(epochs), desc="stage-2 epochs (features)"):  # shown once it runs > 2 s
        smp.set_epoch(epoch)
        order = torch.as_tensor(list(smp), dtype=torch.long, device=features.device)
        rate = lr
        for idx in order.split(batch_size):
            rate = stage2_lr(lr, schedule, epoch, epochs, step, total)
            for group in opt.param_groups:
                group["lr"] = rate
            loss = F.cross_entropy(logits_fn(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        keeper.after_epoch(epoch, rate)
    keeper.restore()


def _init_linear(num_classes: int, dim: int, seed: int, device: torch.device, dtype: torch.dtype,
                 bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same distribution as ``nn.Linear``'s default init, drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(dim)
    w = (torch.rand(num_classes, dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=gen, dtype=torch.float64) * 2 - 1) * bound if bias else None
    w = w.to(device=device, dtype=dtype).requires_grad_(True)
    return w, (b.to(device=device, dtype=dtype).requires_grad_(True) if b is not None else None)


# --- LWS -------------------------------------------------------------------------------------------
def learn_lws(weight: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor, labels: torch.Tensor,
              *, sampler: str = "class_balanced", epochs: int = 5, lr: float = 0.2, batch_size: int = 512,
              momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
              sampler_kw: dict[str, Any] | None = None, schedule: str = "epoch",
              val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
              record: dict[str, Any] | None = None) -> torch.Tensor:
    """Learn per-class scales s (C,) with logits = s * (W f + b), W and b frozen.

    Official recipe: 5 epochs, lr 0.2 with the per-epoch cosine (``schedule="epoch"``, last epoch
    at 0), batch 512, class-aware sampling (``sampler="class_aware"``), the best epoch on the
    balanced val split kept (give ``val_features`` / ``val_labels``). Weight decay defaults to 0
    here: decay on s shrinks every logit towards 0, which acts as a temperature rather than a
    rebalancing. Use ``apply_lws`` to fold s into W, b. ``record`` gets the lrs and val curve.
    """
    f, y = _check_features(features, labels, "LWS training")
    w = weight.detach().to(device=f.device, dtype=f.dtype)
    C = int(w.shape[0])
    if w.dim() != 2 or w.shape[1] != f.shape[1]:
        raise DataError(f"classifier weight {tuple(w.shape)} does not match feature dim {f.shape[1]}")
    b = torch.zeros(C, device=f.device, dtype=f.dtype) if bias is None else bias.detach().to(f.device, f.dtype)
    scales = torch.ones(C, device=f.device, dtype=f.dtype, requires_grad=True)
    _fit([scales], lambda x: (x @ w.t() + b) * scales, f, y, C, epochs=epochs, lr=lr, batch_size=batch_size,
         momentum=momentum, weight_decay=weight_decay, sampler=sampler, sampler_kw=sampler_kw, seed=seed,
         schedule=schedule, val=_val_pair(val_features, val_labels, f), record=record)
    return scales.detach()


def _val_pair(features: torch.Tensor | None, labels: torch.Tensor | None,
              like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if features is None:
        return None
    vf, vy = _check_features(features, labels, "validation")
    return vf.to(device=like.device, dtype=like.dtype), vy.to(like.device)


def apply_lws(weight: torch.Tensor, bias: torch.Tensor | None,
              scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold LWS scales into a plain linear classifier: (s_i w_i, s_i b_i)."""
    s = scales.detach().to(weight)
    return weight.detach() * s[:, None], None if bias is None else bias.detach() * s


# --- cRT -------------------------------------------------------------------------------------------
def retrain_crt(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 10,
                lr: float = 0.2, batch_size: int = 512, momentum: float = 0.9, weight_decay: float = 5e-4,
                sampler: str = "class_balanced", sampler_kw: dict[str, Any] | None = None, seed: int = 0,
                bias: bool = True, schedule: str = "epoch", val_features: torch.Tensor | None = None,
                val_labels: torch.Tensor | None = None,
                record: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-initialise a linear classifier and train it on frozen (cached) features.

    Defaults are the official ImageNet-LT recipe (10 epochs, SGD lr 0.2 momentum 0.9, wd 5e-4,
    per-epoch cosine to 0, batch 512); the official sampler is ``"class_aware"`` with 4 images per
    class, and the official loop keeps the best epoch on val (pass ``val_features`` / ``val_labels``).
    Returns ``(weight [C, D], bias [C] or None)``.
    """
    f, y = _check_features(features, labels, "cRT training")
    if int(y.max()) >= num_classes:
        raise DataError(f"label {int(y.max())} out of range for num_classes={num_classes}")
    w, b = _init_linear(num_classes, int(f.shape[1]), seed, f.device, f.dtype, bias)
    params = [w] + ([b] if b is not None else [])
    _fit(params, lambda x: F.linear(x, w, b), f, y, num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
         momentum=momentum, weight_decay=weight_decay, sampler=sampler, sampler_kw=sampler_kw, seed=seed,
         schedule=schedule, val=_val_pair(val_features, val_labels, f), record=record)
    return w.detach(), (b.detach() if b is not None else None)


def retrain_crt_on_images(backbone: nn.Module, dataset: Any, transform: Callable[[torch.Tensor], torch.Tensor],
                          num_classes: int | None = None, *, epochs: int = 10, lr: float = 0.2,
                          batch_size: int = 512, momentum: float = 0.9, weight_decay: float = 5e-4,
                          sampler: str = "class_balanced", sampler_kw: dict[str, Any] | None = None,
                          seed: int = 0, freeze_bn: bool = True, bias: bool = True,
                          device: str | torch.device = "cpu",
                          num_workers: int = 0, schedule: str = "epoch", val_dataset: Any = None,
                          val_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          record: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cRT with the frozen backbone run on augmented image batches every step.

    ``freeze_bn=True`` runs the backbone in eval mode: its BatchNorm statistics stay those of
    stage 1, so the features the classifier is trained on are the ones it will see at test time.
    ``freeze_bn=False`` reproduces the official code, whose frozen backbone still sits in train
    mode: BN uses batch statistics and its running statistics drift towards the class-balanced
    distribution. The backbone's running statistics are then modified in place and must be saved
    with the new classifier. Backbone parameters never receive gradients either way; the module's
    train/eval flag is restored on return. The global RNG is left untouched. ``schedule`` as
    ``stage2_lr``; with ``val_dataset`` (+ ``val_transform``) the backbone (eval mode) scores it after
    every epoch and the best epoch's classifier and BatchNorm statistics are kept, as the official loop.
    """
    from ..data.loader import BatchLoader

    C = int(num_classes if num_classes is not None else dataset.num_classes)
    labels = torch.as_tensor(dataset.labels).long()
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    dev = torch.device(device)
    dim = int(backbone.out_dim)
    was_training = backbone.training
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        w, b = _init_linear(C, dim, seed, dev, torch.float32, bias)
        params = [w] + ([b] if b is not None else [])
        smp = _make_sampler(sampler, labels, seed, C, sampler_kw, epochs)
        total = epochs * math.ceil(len(smp) / batch_size)
        stage2_lr(lr, schedule, 0, epochs, 0, 1)
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        score = None
        if val_dataset is not None:
            from ..inference import extract_features
            vy = torch.as_tensor(val_dataset.labels).long().to(dev)

            def score() -> float:
                vf, _ = extract_features(backbone, val_dataset, val_transform or transform, batch_size, dev)
                backbone.train(not freeze_bn)  # extract_features restores the flag it found
                return _top1(lambda x: F.linear(x, w, b), vf.to(dev), vy)
        keeper = _BestEpoch(params, score, modules=[] if freeze_bn else [backbone], record=record)
        backbone.train(not freeze_bn)
        step, rate = 0, lr
        try:
            from ..utils import progress
            for epoch in progress(range(epochs), desc="stage-2 epochs (images)"):  # shown once it runs > 2 s
                smp.set_epoch(epoch)
                # BatchLoader gathers in-memory images with one index per batch (per-item
                # collation dominated the step time on small images); the sampler fixes the order
                loader = BatchLoader(dataset, batch_size, list(smp), num_workers=num_workers)
                for images, y in loader:
                    x = transform(images.to(dev))
                    with torch.no_grad():
                        feats = backbone(x).float()
                    rate = stage2_lr(lr, schedule, epoch, epochs, step, total)
                    for group in opt.param_groups:
                        group["lr"] = rate
                    loss = F.cross_entropy(F.linear(feats, w, b), y.to(dev).long())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                keeper.after_epoch(epoch, rate)
            keeper.restore()
        finally:
            backbone.train(was_training)
    return w.detach(), (b.detach() if b is not None else None)
