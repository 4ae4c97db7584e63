"""The four stage-2 methods as registered fits on a ``Stage2Context`` (see ``stage2``).

A method takes the loaded run (``ctx``: model, cached features of its splits) and its resolved
options and returns a ``Fit``: the new head's registry name, keywords and state dict, a new
backbone state only when it changed (cRT on images with live BatchNorm), and plain-data ``info``
for the results (tau curve, LWS scales...). Register another method with
``@register_method("name", options={...})``; ``lowshot decouple`` picks it up.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, LowshotError
from ..registry import Registry
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

_KINDS = {"bool": "true/false", "int": "an integer", "float": "a number", "str": "a string",
          "float?": "a number or null", "str?": "a string or null", "list?": "a list of numbers or null",
          "dict": "a mapping like {k: v}", "str|bool": "a string or true/false"}


@dataclass(frozen=True)
class OptionSpec:
    """One ``key=value`` option: default, kind (see ``_KINDS``) and a one-line help."""

    default: Any
    kind: str
    help: str = ""

    def coerce(self, value: Any, what: str) -> Any:
        k, ok = self.kind, False
        if k.endswith("?") and value is None:
            return None
        base = k.rstrip("?")
        if base == "bool":
            ok = isinstance(value, bool)
        elif base == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif base == "str":
            ok = isinstance(value, str)
        elif base == "list":
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            value = [float(v) for v in value] if ok else value
        elif base == "dict":
            ok = isinstance(value, dict)
        elif base == "str|bool":
            ok = isinstance(value, (str, bool))
        if not ok:
            raise ConfigError(f"{what} expects {_KINDS[k]}, got {value!r}")
        return value


@dataclass
class Fit:
    head_name: str
    head_kwargs: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


METHODS: Registry[Callable[..., Fit]] = Registry("decouple method")
METHOD_OPTIONS: dict[str, dict[str, OptionSpec]] = {}


def register_method(name: str, *aliases: str, options: dict[str, OptionSpec]) -> Callable[[Any], Any]:
    def deco(fn: Callable[..., Fit]) -> Callable[..., Fit]:
        METHODS.register(name, *aliases)(fn)
        METHOD_OPTIONS[name] = dict(options)
        return fn
    return deco


def _sgd_options(epochs: int, weight_decay: float, sampler: str) -> dict[str, OptionSpec]:
    return {
        "sampler": OptionSpec(sampler, "str", "stage-2 sampler (class_balanced, class_aware, sqrt, ...)"),
        "sampler_kwargs": OptionSpec({}, "dict", "sampler options, e.g. {samples_per_class: 4}"),
        "epochs": OptionSpec(epochs, "int", "passes of the sampler"),
        "lr": OptionSpec(0.2, "float", "SGD learning rate, cosine-decayed to 0 (see schedule)"),
        "schedule": OptionSpec("epoch", "str", "epoch (official: per-epoch cosine, last epoch at lr 0) | "
                                               "step (per-step cosine)"),
        "select": OptionSpec("best_val", "str", "best_val (official: keep the epoch with the best top-1 on "
                                                "val_split) | last (keep the final epoch)"),
        "val_split": OptionSpec("val", "str?", "balanced split that select=best_val scores every epoch"),
        "batch_size": OptionSpec(512, "int", "batch size"),
        "momentum": OptionSpec(0.9, "float", "SGD momentum"),
        "weight_decay": OptionSpec(weight_decay, "float", "SGD weight decay"),
        "seed": OptionSpec(0, "int", "seed of the sampler and the re-initialised weights"),
    }


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


def linear_parts(head: torch.nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) with eval logits = W f + b for inner-product heads; other heads raise ConfigError."""
    from ..heads import LinearHead, NegSoftmaxHead, VirtualSoftmaxHead
    w = head.weight.detach()
    b = head.bias.detach() if getattr(head, "bias", None) is not None else None
    if isinstance(head, NegSoftmaxHead):  # s (W f + b): fold the scale into the classifier
        return w * head.scale, None if b is None else b * head.scale
    if isinstance(head, (LinearHead, VirtualSoftmaxHead)):
        return w, b
    raise ConfigError(f"{what} rescales the rows of an inner-product classifier, but the checkpoint's head is "
                      f"{getattr(head, 'head_name', type(head).__name__)!r} (supported: linear, neg_softmax, "
                      f"virtual_softmax); use crt or ncm")


def _linear_fit(weight: torch.Tensor, bias: torch.Tensor | None, info: dict[str, Any]) -> Fit:
    state = {"weight": weight.detach().float().cpu()}
    if bias is not None:
        state["bias"] = bias.detach().float().cpu()
    return Fit("linear", {"bias": bias is not None}, state, None, info)


# ----------------------------------------------------------------------------- cRT

@register_method("crt", "cRT", options={
    **_sgd_options(10, 5e-4, "class_balanced"),
    "bias": OptionSpec(True, "bool", "give the new classifier a bias"),
    "images": OptionSpec(False, "bool", "train on augmented images through the frozen backbone"),
    "freeze_bn": OptionSpec(True, "bool", "images=true: keep BatchNorm statistics (false: official code)"),
    "num_workers": OptionSpec(0, "int", "images=true: loader workers for file datasets"),
})
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

@register_method("tau_norm", "tau", "taunorm", "tau-norm", options={
    "tau": OptionSpec(None, "float?", "fixed tau (default: best on the balanced val split)"),
    "grid": OptionSpec(None, "list?", "tau grid (default 0, 0.1, ..., 2.0)"),
    "criterion": OptionSpec("accuracy", "str", "val criterion: accuracy | class_mean"),
    "val_split": OptionSpec("val", "str?", "balanced split that chooses tau (null: none, needs tau=)"),
})
def tau_norm(ctx: Stage2Context, opts: dict[str, Any]) -> Fit:
    """w_i / ||w_i||^tau, bias dropped; tau picked on the balanced val split unless fixed.

    The curve on the test split is recorded too (``test_curve``), never used for the choice: it
    shows how far the val-selected tau is from the test-optimal one the official code reports.
    """
    w, _ = linear_parts(ctx.model.head, "tau_norm")
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

@register_method("lws", "LWS", options=_sgd_options(5, 0.0, "class_balanced"))
def lws(ctx: Stage2Context, opts: dict[str, Any]) -> Fit:
    """Per-class scales s on the joint classifier (W, b frozen), class-balanced; folded into W, b.
    Schedule and best-val selection as ``crt``."""
    w, b = linear_parts(ctx.model.head, "lws")
    split = _selection(ctx, opts, "lws")
    record: dict[str, Any] = {}
    f, y = ctx.features(opts["train_split"])
    s = learn_lws(w.to(ctx.device), None if b is None else b.to(ctx.device), f.to(ctx.device), y.to(ctx.device),
                  record=record, **_val_kwargs(ctx, split), **_sgd_kwargs(opts))
    ws, bs = apply_lws(w.to(s.device), None if b is None else b.to(s.device), s)
    return _linear_fit(ws, bs, {"scales": s.cpu().tolist(), **_stage2_info(record, split, opts)})


# ----------------------------------------------------------------------------- NCM

@register_method("ncm", "NCM", options={
    "metric": OptionSpec("l2", "str", "l2 | cosine"),
    "center": OptionSpec("all", "str|bool", "centre before normalising: all (mean of all training features, "
                                            "official) | class_mean (mean of class means) | none"),
})
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
