"""The four stage-2 methods of Kang et al. (ICLR 2020): cRT, tau-norm, LWS and NCM.

Each is a ``Stage2Method`` dataclass of its typed options whose ``fit(run)`` returns a ``Fit``
(the contract is ``stage2``); the algorithms on tensors are in ``decouple``.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, LowshotError
from ..inference import FrozenRun
from .decouple import DEFAULT_TAU_GRID, apply_lws, learn_lws, retrain_crt, retrain_crt_on_images, select_tau, tau_normalize
from .stage2 import Fit, Stage2Method, opt, register_stage2_method


@dataclass
class SGDOptions(Stage2Method):
    """Options of the class-balanced SGD stage 2 (cRT, LWS); defaults: cRT's."""

    sampler: str = opt("class_balanced", "stage-2 sampler (class_balanced, class_aware, sqrt, ...)")
    sampler_kwargs: dict[str, Any] = opt({}, "sampler options, e.g. {samples_per_class: 4}")
    epochs: int = opt(10, "passes of the sampler")
    lr: float = opt(0.2, "SGD learning rate, cosine-decayed to 0 (see schedule)")
    schedule: str = opt("epoch", "epoch (official: per-epoch cosine, last epoch at lr 0) | step (per-step cosine)")
    select: str = opt("best_val", "best_val (official: keep the epoch with the best top-1 on val_split) | "
                                  "last (keep the final epoch)")
    val_split: str | None = opt("val", "balanced split that select=best_val scores every epoch")
    batch_size: int = opt(512, "batch size")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay")
    seed: int = opt(0, "seed of the sampler and the re-initialised weights")


def _sgd_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "lr", "batch_size", "momentum", "weight_decay", "sampler", "seed", "schedule")
    return {**{k: opts[k] for k in keys}, "sampler_kw": dict(opts["sampler_kwargs"])}


def _selection(run: FrozenRun, opts: dict[str, Any], what: str) -> str | None:
    """The validation split that picks the stage-2 epoch (None: keep the last epoch)."""
    from .decouple import SCHEDULES, SELECTIONS
    if opts["schedule"] not in SCHEDULES:
        raise ConfigError(f"{what} option 'schedule' must be one of {', '.join(SCHEDULES)}, got {opts['schedule']!r}")
    if opts["select"] not in SELECTIONS:
        raise ConfigError(f"{what} option 'select' must be one of {', '.join(SELECTIONS)}, got {opts['select']!r}")
    if opts["select"] == "last":
        return None
    if opts["val_split"] is None:
        raise ConfigError(f"{what} select=best_val needs val_split=NAME (or pass select=last)")
    try:
        run.dataset(opts["val_split"])
    except LowshotError as err:
        raise ConfigError(f"{what} keeps the best epoch on a balanced validation split (as the official code), "
                          f"but {err}; pass val_split=NAME or select=last") from None
    return opts["val_split"]


def _val_kwargs(run: FrozenRun, split: str | None) -> dict[str, Any]:
    if split is None:
        return {}
    vf, vy = run.features(split)
    return {"val_features": vf.to(run.device), "val_labels": vy.to(run.device)}


def _stage2_info(record: dict[str, Any], split: str | None, opts: dict[str, Any]) -> dict[str, Any]:
    info = {"schedule": opts["schedule"], "select": opts["select"], "epoch_lrs": record.get("lrs", [])}
    if split is not None:
        info.update(val_split=split, val_curve=record.get("val_curve", []), best_epoch=record.get("best_epoch"))
    return info


def _linear_parts(run: FrozenRun, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the joint head (``Head.linear_parts``), the error naming the method."""
    try:
        return run.model.head.linear_parts()
    except ConfigError as err:
        raise ConfigError(f"{what} rescales the rows of an inner-product classifier, but {err}") from None


def _linear_fit(weight: torch.Tensor, bias: torch.Tensor | None, info: dict[str, Any]) -> Fit:
    state = {"weight": weight.detach().float().cpu()}
    if bias is not None:
        state["bias"] = bias.detach().float().cpu()
    return Fit("linear", {"bias": bias is not None}, state, None, info)


# ----------------------------------------------------------------------------- cRT

@register_stage2_method("crt", "cRT")
@dataclass
class CRT(SGDOptions):
    """cRT (see ``crt``)."""

    bias: bool = opt(True, "give the new classifier a bias")
    images: bool = opt(False, "train on augmented images through the frozen backbone")
    freeze_bn: bool = opt(True, "images=true: keep BatchNorm statistics (false: official code)")
    num_workers: int = opt(0, "images=true: loader workers for file datasets")

    def fit(self, run: FrozenRun) -> Fit:
        return crt(run, self.options())


def crt(run: FrozenRun, opts: dict[str, Any]) -> Fit:
    """Re-initialised linear classifier, class-balanced, backbone frozen; by default trained like the
    official loop (per-epoch cosine whose last epoch runs at lr 0, best epoch on ``val_split`` kept).

    Default: on cached features, which is exactly a frozen eval-mode backbone without
    augmentation, and on CPU hundreds of times cheaper than running the backbone every step
    (benchmarks/crt_features_vs_images.py). ``images=true`` adds the training
    config's augmentation; ``freeze_bn=false`` lets BatchNorm statistics follow the balanced
    batches as the official code silently does, and the updated backbone is saved.
    """
    C = run.num_classes
    info: dict[str, Any] = {"mode": "images" if opts["images"] else "features"}
    split = _selection(run, opts, "crt")
    record: dict[str, Any] = {}
    if not opts["images"]:
        f, y = run.features(opts["train_split"])
        w, b = retrain_crt(f.to(run.device), y.to(run.device), C, bias=opts["bias"], record=record,
                           **_val_kwargs(run, split), **_sgd_kwargs(opts))
        return _linear_fit(w, b, {**info, **_stage2_info(record, split, opts)})
    from ..data.transforms import build_transform
    ds = run.dataset(opts["train_split"])
    meta, a = run.checkpoint["data"], run.config.augment
    train_tf = build_transform(True, meta["image_size"], meta["channels"], meta["mean"], meta["std"],
                               crop_scale=tuple(a.crop_scale) if a.crop_scale is not None else None,
                               flip=a.flip, jitter=a.jitter, affine=dataclasses.asdict(a.affine))
    backbone = copy.deepcopy(run.model.backbone)  # the context keeps the joint backbone intact
    w, b = retrain_crt_on_images(backbone, ds, train_tf, C, bias=opts["bias"], freeze_bn=opts["freeze_bn"],
                                 device=run.device, num_workers=opts["num_workers"], record=record,
                                 val_dataset=None if split is None else run.dataset(split),
                                 val_transform=run.transform, **_sgd_kwargs(opts))
    info["freeze_bn"] = opts["freeze_bn"]
    fit = _linear_fit(w, b, {**info, **_stage2_info(record, split, opts)})
    if not opts["freeze_bn"]:
        fit.model_state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    return fit


# ----------------------------------------------------------------------------- tau-norm

@register_stage2_method("tau_norm", "tau", "taunorm", "tau-norm")
@dataclass
class TauNorm(Stage2Method):
    """tau-normalisation (see ``tau_norm``)."""

    tau: float | None = opt(None, "fixed tau (default: best on the balanced val split)")
    grid: list[float] | None = opt(None, "tau grid (default 0, 0.1, ..., 2.0)")
    criterion: str = opt("accuracy", "val criterion: accuracy | class_mean")
    val_split: str | None = opt("val", "balanced split that chooses tau (null: none, needs tau=)")

    def fit(self, run: FrozenRun) -> Fit:
        return tau_norm(run, self.options())


def tau_norm(run: FrozenRun, opts: dict[str, Any]) -> Fit:
    """w_i / ||w_i||^tau, bias dropped; tau picked on the balanced val split unless fixed.

    The curve on the test split is recorded too (``test_curve``), never used for the choice: it
    shows how far the val-selected tau is from the test-optimal one the official code reports.
    """
    w, _ = _linear_parts(run, "tau_norm")
    grid = list(DEFAULT_TAU_GRID) if opts["grid"] is None else opts["grid"]
    info: dict[str, Any] = {"criterion": opts["criterion"], "val_split": opts["val_split"], "grid": grid}
    curve: list[tuple[float, float]] = []
    best: float | None = None
    if opts["val_split"] is not None:
        try:
            vf, vy = run.features(opts["val_split"])
        except LowshotError as err:
            if opts["tau"] is None:
                raise ConfigError(f"tau_norm chooses tau on a balanced validation split, but {err}; pass "
                                  f"tau=VALUE or val_split=NAME") from None
        else:
            best, curve = select_tau(w, vf, vy, grid, criterion=opts["criterion"])
    elif opts["tau"] is None:
        raise ConfigError("tau_norm with val_split=null needs a fixed tau=VALUE")
    tau = float(opts["tau"]) if opts["tau"] is not None else float(best)  # type: ignore[arg-type]
    tf, ty = run.features(opts["test_split"])
    with warnings.catch_warnings():  # the "still rising at the grid's end" hint is about val only
        warnings.simplefilter("ignore")
        _, test_curve = select_tau(w, tf, ty, grid, criterion=opts["criterion"])
    info.update(tau=tau, tau_source="fixed" if opts["tau"] is not None else f"best on {opts['val_split']}",
                tau_curve=[list(p) for p in curve], test_curve=[list(p) for p in test_curve])
    return _linear_fit(tau_normalize(w, tau), None, info)


# ----------------------------------------------------------------------------- LWS

@register_stage2_method("lws", "LWS")
@dataclass
class LWS(SGDOptions):
    """Learnable weight scaling (see ``lws``); SGD options as cRT with fewer epochs, no decay."""

    epochs: int = opt(5, "passes of the sampler")
    weight_decay: float = opt(0.0, "SGD weight decay")

    def fit(self, run: FrozenRun) -> Fit:
        return lws(run, self.options())


def lws(run: FrozenRun, opts: dict[str, Any]) -> Fit:
    """Per-class scales s on the joint classifier (W, b frozen), class-balanced; folded into W, b.
    Schedule and best-val selection as ``crt``."""
    w, b = _linear_parts(run, "lws")
    split = _selection(run, opts, "lws")
    record: dict[str, Any] = {}
    f, y = run.features(opts["train_split"])
    s = learn_lws(w.to(run.device), None if b is None else b.to(run.device), f.to(run.device), y.to(run.device),
                  record=record, **_val_kwargs(run, split), **_sgd_kwargs(opts))
    ws, bs = apply_lws(w.to(s.device), None if b is None else b.to(s.device), s)
    return _linear_fit(ws, bs, {"scales": s.cpu().tolist(), **_stage2_info(record, split, opts)})


# ----------------------------------------------------------------------------- NCM

@register_stage2_method("ncm", "NCM")
@dataclass
class NCM(Stage2Method):
    """Nearest class mean (see ``ncm``)."""

    metric: str = opt("l2", "l2 | cosine")
    center: str | bool = opt("all", "centre before normalising: all (mean of all training features, "
                                    "official) | class_mean (mean of class means) | none")

    def fit(self, run: FrozenRun) -> Fit:
        return ncm(run, self.options())


def ncm(run: FrozenRun, opts: dict[str, Any]) -> Fit:
    """Class means of centred, L2-normalised training features, as an ``ncm`` head (official centre:
    the mean of all training features; see lowshot.heads.ncm)."""
    from ..heads.ncm import NCMHead, resolve_center
    center = resolve_center(opts["center"])
    f, y = run.features(opts["train_split"])
    head = NCMHead(run.num_classes, int(f.shape[1]), metric=opts["metric"])
    head.fit(f, y, center=center)
    return Fit("ncm", {"metric": opts["metric"]}, dict(head.state_dict()), None,
               {"metric": opts["metric"], "center": center})
