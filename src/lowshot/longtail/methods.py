"""The four stage-2 methods as registered fits on a ``Stage2Context`` (see ``stage2``).

A method takes the loaded run (``ctx``: model, cached features of its splits) and its resolved
options and returns a ``Fit``: the new head's registry name, keywords and state dict, a new
backbone state only when it changed (cRT on images with live BatchNorm), and plain-data ``info``
for the results (tau curve, LWS scales...). A method is a dataclass of its typed options (each
with a help text: ``opt(default, help)``) whose ``fit(ctx)`` returns the ``Fit``; register another
with ``@register_stage2_method("name")`` on a ``Stage2Method`` subclass and ``lowshot decouple``
picks it up. ``create_stage2_method(name, **options)`` checks the options (``Registry.create``).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import ConfigError, LowshotError
from ..registry import Option, Registry
from .decouple import (
    DEFAULT_TAU_GRID,
    apply_lws,
    learn_lws,
    retrain_crt,
    retrain_crt_on_images,
    select_tau,
    tau_normalize,
)

if TYPE_CHECKING:  # pragma: no cover
    from .stage2 import Stage2Context

@dataclass
class Fit:
    head_name: str
    head_kwargs: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


STAGE2_METHODS: Registry[Callable[..., Stage2Method]] = Registry(
    "decouple method", option_error="{what} has no option {key!r} (valid: {valid}){hint}")
METHODS = STAGE2_METHODS  # the historical name
ThresholdRule = Literal["auto", "official", "rank"]


def opt(default: Any, help: str) -> Any:
    """A dataclass option with a one-line ``help`` (``--list-options`` prints it)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunOptions:
    """How ``decouple`` / ``evaluate_checkpoint`` open the run and count many / medium / few."""

    device: str = opt("auto", "device for feature extraction and stage-2 training")
    root: str | None = opt(None, "dataset root (default: the one in the checkpoint's config)")
    train_split: str | None = opt(None, "long-tailed training split (default: data.train_split)")
    feature_batch_size: int = opt(256, "batch size of feature extraction")
    cache: bool = opt(True, "reuse features cached in <run_dir>/features/")
    thresholds: ThresholdRule = opt("auto", "many/medium/few rule: auto | official (>100/<20) | rank")


@dataclass
class Stage2Method(RunOptions):
    """Base class: the options every method takes; subclasses add theirs and implement ``fit``."""

    test_split: str = opt("test", "balanced evaluation split")

    def options(self) -> dict[str, Any]:
        """All options as a plain dict (what the method reads and the results record)."""
        return dataclasses.asdict(self)

    def fit(self, ctx: Stage2Context) -> Fit:  # pragma: no cover - abstract
        raise NotImplementedError


def register_stage2_method(name: str, *aliases: str, **meta: Any) -> Callable[[Any], Any]:
    """Decorator: register a ``Stage2Method`` dataclass (its fields are the checked options)."""
    return STAGE2_METHODS.register(name, *aliases, **meta)


def create_stage2_method(name: str, **options: Any) -> Stage2Method:
    """The configured method ``name``; unknown or wrong-typed options raise ConfigError."""
    return STAGE2_METHODS.create(name, **options)


def list_stage2_methods() -> list[str]:
    """Registered stage-2 method names (aliases excluded), sorted."""
    return STAGE2_METHODS.names()


def stage2_method_options(name: str) -> list[Option]:
    """The options of ``name`` with defaults and help: its own first, then the common ones."""
    common = {f.name for f in dataclasses.fields(Stage2Method)}
    opts = list(STAGE2_METHODS.options(name).values())
    return [o for o in opts if o.name not in common] + [o for o in opts if o.name in common]


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


def _selection(ctx: Stage2Context, opts: dict[str, Any], what: str) -> str | None:
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
        ctx.dataset(opts["val_split"])
    except LowshotError as err:
        raise ConfigError(f"{what} keeps the best epoch on a balanced validation split (as the official code), "
                          f"but {err}; pass val_split=NAME or select=last") from None
    return opts["val_split"]


def _val_kwargs(ctx: Stage2Context, split: str | None) -> dict[str, Any]:
    if split is None:
        return {}
    vf, vy = ctx.features(split)
    return {"val_features": vf.to(ctx.device), "val_labels": vy.to(ctx.device)}


def _stage2_info(record: dict[str, Any], split: str | None, opts: dict[str, Any]) -> dict[str, Any]:
    info = {"schedule": opts["schedule"], "select": opts["select"], "epoch_lrs": record.get("lrs", [])}
    if split is not None:
        info.update(val_split=split, val_curve=record.get("val_curve", []), best_epoch=record.get("best_epoch"))
    return info


def _linear_parts(ctx: Stage2Context, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the joint head (``Head.linear_parts``), the error naming the method."""
    try:
        return ctx.model.head.linear_parts()
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

    def fit(self, ctx: Stage2Context) -> Fit:
        return crt(ctx, self.options())


def crt(ctx: Stage2Context, opts: dict[str, Any]) -> Fit:
    """Re-initialised linear classifier, class-balanced, backbone frozen; by default trained like the
    official loop (per-epoch cosine whose last epoch runs at lr 0, best epoch on ``val_split`` kept).

    Default: on cached features, which is exactly a frozen eval-mode backbone without
    augmentation, and on CPU hundreds of times cheaper than running the backbone every step
    (benchmarks/crt_features_vs_images.py). ``images=true`` adds the training
    config's augmentation; ``freeze_bn=false`` lets BatchNorm statistics follow the balanced
    batches as the official code silently does, and the updated backbone is saved.
    """
    C = ctx.num_classes
    info: dict[str, Any] = {"mode": "images" if opts["images"] else "features"}
    split = _selection(ctx, opts, "crt")
    record: dict[str, Any] = {}
    if not opts["images"]:
        f, y = ctx.features(opts["train_split"])
        w, b = retrain_crt(f.to(ctx.device), y.to(ctx.device), C, bias=opts["bias"], record=record,
                           **_val_kwargs(ctx, split), **_sgd_kwargs(opts))
        return _linear_fit(w, b, {**info, **_stage2_info(record, split, opts)})
    from ..data.transforms import build_transform
    ds = ctx.dataset(opts["train_split"])
    meta, a = ctx.ckpt["data"], ctx.cfg.augment
    train_tf = build_transform(True, meta["image_size"], meta["channels"], meta["mean"], meta["std"],
                               crop_scale=tuple(a.crop_scale) if a.crop_scale is not None else None,
                               flip=a.flip, jitter=a.jitter, affine=dataclasses.asdict(a.affine))
    backbone = copy.deepcopy(ctx.model.backbone)  # the context keeps the joint backbone intact
    w, b = retrain_crt_on_images(backbone, ds, train_tf, C, bias=opts["bias"], freeze_bn=opts["freeze_bn"],
                                 device=ctx.device, num_workers=opts["num_workers"], record=record,
                                 val_dataset=None if split is None else ctx.dataset(split),
                                 val_transform=ctx.transform, **_sgd_kwargs(opts))
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

    def fit(self, ctx: Stage2Context) -> Fit:
        return tau_norm(ctx, self.options())


def tau_norm(ctx: Stage2Context, opts: dict[str, Any]) -> Fit:
    """w_i / ||w_i||^tau, bias dropped; tau picked on the balanced val split unless fixed.

    The curve on the test split is recorded too (``test_curve``), never used for the choice: it
    shows how far the val-selected tau is from the test-optimal one the official code reports.
    """
    w, _ = _linear_parts(ctx, "tau_norm")
    grid = list(DEFAULT_TAU_GRID) if opts["grid"] is None else opts["grid"]
    info: dict[str, Any] = {"criterion": opts["criterion"], "val_split": opts["val_split"], "grid": grid}
    curve: list[tuple[float, float]] = []
    best: float | None = None
    if opts["val_split"] is not None:
        try:
            vf, vy = ctx.features(opts["val_split"])
        except LowshotError as err:
            if opts["tau"] is None:
                raise ConfigError(f"tau_norm chooses tau on a balanced validation split, but {err}; pass "
                                  f"tau=VALUE or val_split=NAME") from None
        else:
            best, curve = select_tau(w, vf, vy, grid, criterion=opts["criterion"])
    elif opts["tau"] is None:
        raise ConfigError("tau_norm with val_split=null needs a fixed tau=VALUE")
    tau = float(opts["tau"]) if opts["tau"] is not None else float(best)  # type: ignore[arg-type]
    tf, ty = ctx.features(opts["test_split"])
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

    def fit(self, ctx: Stage2Context) -> Fit:
        return lws(ctx, self.options())


def lws(ctx: Stage2Context, opts: dict[str, Any]) -> Fit:
    """Per-class scales s on the joint classifier (W, b frozen), class-balanced; folded into W, b.
    Schedule and best-val selection as ``crt``."""
    w, b = _linear_parts(ctx, "lws")
    split = _selection(ctx, opts, "lws")
    record: dict[str, Any] = {}
    f, y = ctx.features(opts["train_split"])
    s = learn_lws(w.to(ctx.device), None if b is None else b.to(ctx.device), f.to(ctx.device), y.to(ctx.device),
                  record=record, **_val_kwargs(ctx, split), **_sgd_kwargs(opts))
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

    def fit(self, ctx: Stage2Context) -> Fit:
        return ncm(ctx, self.options())


def ncm(ctx: Stage2Context, opts: dict[str, Any]) -> Fit:
    """Class means of centred, L2-normalised training features, as an ``ncm`` head (official centre:
    the mean of all training features; see lowshot.heads.ncm)."""
    from ..heads.ncm import NCMHead, resolve_center
    center = resolve_center(opts["center"])
    f, y = ctx.features(opts["train_split"])
    head = NCMHead(ctx.num_classes, int(f.shape[1]), metric=opts["metric"])
    head.fit(f, y, center=center)
    return Fit("ncm", {"metric": opts["metric"]}, dict(head.state_dict()), None,
               {"metric": opts["metric"], "center": center})
