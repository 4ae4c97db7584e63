"""Stage 2 of "Decoupling Representation and Classifier": the method contract, and running it on a run.

The contract (this file): a stage-2 method is a dataclass of its typed options (``opt(default,
help)``; ``Registry.create`` checks them) registered with ``@register_stage2_method("name")``, whose
``fit(run)`` gets the trained run as a ``FrozenRun`` (model, config, cached features of its
splits, every split checked to have the checkpoint's classes) and returns a ``Fit``: the new
head's registry name, keywords and state dict, a new backbone state only when it changed (cRT on
images with live BatchNorm), and plain-data ``info`` for the results. The four methods of the
paper live in ``methods``; ``lowshot decouple`` picks up any registered one.

``decouple(ckpt, "crt" | "tau_norm" | "lws" | "ncm", **options)`` fits one and writes two files next
to the checkpoint (default ``<run_dir>/decouple_<method>.pt`` and ``.json``):

* a regular checkpoint (``kind="decouple"``) whose stored config names the new head, so
  ``model_from_checkpoint``, ``lowshot embed`` and ``lowshot eval`` use it unchanged;
* the balanced-test results of the decoupled AND the joint classifier: overall top-1,
  class-mean accuracy, many / medium / few-shot and a per-class table.

The reported numbers are computed by the head rebuilt from the checkpoint dict that is saved, so
file and report cannot disagree. ``evaluate_checkpoint`` gives the same metrics for any checkpoint
(joint or decoupled).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import save_checkpoint
from ..fileio import write_text_atomic
from ..data.longtail import class_counts
from ..errors import ConfigError
from ..inference import FrozenRun
from ..models import model_from_checkpoint
from ..registry import Option, Registry, checked_call
from .metrics import THRESHOLD_RULES, evaluate_logits, format_results, shot_thresholds

# ----------------------------------------------------------------------------- the contract

@dataclass
class Fit:
    head_name: str
    head_kwargs: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


STAGE2_METHODS: Registry[Callable[..., Stage2Method]] = Registry(
    "decouple method", option_error="{what} has no option {key!r} (valid: {valid}){hint}")
ThresholdRule = Literal[THRESHOLD_RULES]  # type: ignore[valid-type]


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

    def fit(self, run: FrozenRun) -> Fit:  # pragma: no cover - abstract
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


def valid_options(method: str) -> dict[str, Option]:
    """Every option ``method`` accepts (its own, then the common ones), with default and help."""
    return {o.name: o for o in stage2_method_options(method)}


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- ``options``, checked by the method registry (unknown keys name the valid ones)."""
    return create_stage2_method(method, **options).options()

# ----------------------------------------------------------------------------- running a method

def _open(checkpoint: str | Path, opts: dict[str, Any], log: Callable[[str], None]) -> FrozenRun:
    """The joint run, every split checked to hold its classes (a stage-2 head scores exactly those)."""
    return FrozenRun.open(checkpoint, device=opts["device"], root=opts["root"], batch_size=opts["feature_batch_size"],
                          cache=opts["cache"], same_classes=True, log=log)


def _train_counts(run: FrozenRun, split: str) -> list[int]:
    return class_counts(run.dataset(split).labels, run.num_classes).tolist()


@torch.no_grad()
def _head_logits(head: torch.nn.Module, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    head.eval()
    return torch.cat([head(f.to(device)).float().cpu() for f in features.split(8192)])


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", *, log: Callable[[str], None] = print,
                        **options: Any) -> dict[str, Any]:
    """Long-tail metrics of a checkpoint's own classifier on ``split`` (joint or decoupled).

    Options: device, root, train_split, feature_batch_size, cache, thresholds (as ``decouple``).
    """
    opts = dataclasses.asdict(checked_call(RunOptions, "evaluate_checkpoint", **options))
    run = _open(checkpoint, opts, log)
    train_split = opts["train_split"] or run.config.data.train_split
    counts = _train_counts(run, train_split)
    thr = shot_thresholds(counts, opts["thresholds"])
    f, y = run.features(split)
    metrics = evaluate_logits(_head_logits(run.model.head, f, run.device), y, counts, run.class_names, thr)
    return {"checkpoint": str(run.path), "kind": run.checkpoint.get("kind", "train"), "method": run.checkpoint.get("method", "joint"),
            "head": run.config.head.name, "dataset": run.config.data.name, "split": split, "train_split": train_split,
            "train_counts": counts, "thresholds": thr, "metrics": metrics}


# ----------------------------------------------------------------------------- decouple

def decouple(checkpoint: str | Path, method: str, *, out: str | Path | None = None,
             log: Callable[[str], None] = print, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Fit stage-2 classifier ``method`` on a joint checkpoint; write checkpoint + JSON; return
    ``(checkpoint_path, results)``. See ``valid_options(method)`` for the options."""
    name = STAGE2_METHODS.canonical(method)
    opts = resolve_options(name, options)
    run = _open(checkpoint, opts, log)
    train_split = opts["train_split"] or run.config.data.train_split
    opts["train_split"] = train_split
    out_path = Path(out) if out is not None else run.run_dir / f"decouple_{name}.pt"
    if out_path.resolve() == run.path.resolve():
        raise ConfigError(f"--out {out_path} would overwrite the source checkpoint")
    counts = _train_counts(run, train_split)
    thr = shot_thresholds(counts, opts["thresholds"])

    t0, e0 = time.perf_counter(), run.extract_seconds
    fit: Fit = create_stage2_method(name, **opts).fit(run)
    fit_seconds = time.perf_counter() - t0 - (run.extract_seconds - e0)  # the method alone
    new = _decoupled_checkpoint(run, name, opts, fit)
    model, _ = model_from_checkpoint(new)  # what is saved is what is evaluated
    model = model.to(run.device).eval()
    test = opts["test_split"]
    tf, ty = run.features(test, backbone=model.backbone if fit.model_state is not None else None)
    jf, jy = run.features(test)
    results = {
        "method": name, "checkpoint": str(out_path), "source": str(run.path), "dataset": run.config.data.name,
        "train_split": train_split, "test_split": test, "train_counts": counts, "thresholds": thr,
        "options": opts, "info": fit.info, "fit_seconds": round(fit_seconds, 3),
        "feature_seconds": round(run.extract_seconds, 3), "features_extracted": list(run.extracted),
        "metrics": evaluate_logits(_head_logits(model.head, tf, run.device), ty, counts, run.class_names, thr),
        "joint": evaluate_logits(_head_logits(run.model.head, jf, run.device), jy, counts, run.class_names, thr),
        "joint_head": run.config.head.name,
    }
    new["results"] = _plain(results)
    save_checkpoint(new, out_path)
    write_text_atomic(out_path.with_suffix(".json"), _json(results))
    log(format_results(results))
    return out_path, results


def _decoupled_checkpoint(run: FrozenRun, method: str, opts: dict[str, Any], fit: Fit) -> dict[str, Any]:
    """Same plain-data format as a training checkpoint; config.head names the new head."""
    config = dict(run.checkpoint["config"])
    config["head"] = {"name": fit.head_name, "margin": 0.0, "scale": None, "kwargs": dict(fit.head_kwargs)}
    src = run.checkpoint
    out = {
        "kind": "decouple", "method": method,
        "model": fit.model_state if fit.model_state is not None else src["model"],
        "head": {k: v.detach().cpu().contiguous() for k, v in fit.head_state.items()},
        "config": config, "class_names": list(src["class_names"]), "data": dict(src["data"]),
        "epoch": src.get("epoch"), "step": src.get("step"),
        "source": str(run.path),
        "source_info": {"kind": src.get("kind", "train"), "method": src.get("method", "joint"),
                        "head": run.config.head.name, "epoch": src.get("epoch")},
        "backbone_updated": fit.model_state is not None,
        "options": _plain(opts), "info": _plain(fit.info),
    }
    for key in ("tau", "tau_curve"):  # top level too: what a reader of a tau-norm checkpoint looks for
        if key in fit.info:
            out[key] = _plain(fit.info[key])
    return out


# ----------------------------------------------------------------------------- output

def _plain(obj: Any) -> Any:
    """Plain data for checkpoints (weights_only) and JSON: tensors -> lists, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json(obj: Any) -> str:
    def strict(x: Any) -> Any:  # NaN (an empty group) is not JSON: write null
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, list):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(_plain(obj)), indent=1) + "\n"
