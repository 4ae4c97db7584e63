"""Stage 2 of "Decoupling Representation and Classifier" on a trained checkpoint.

``decouple(ckpt, "crt" | "tau_norm" | "lws" | "ncm", **options)`` loads the jointly trained model,
extracts (and caches, see ``cache``) features of the checkpoint's own dataset splits, fits the new
classifier (``methods``), and writes two files next to the checkpoint (default
``<run_dir>/decouple_<method>.pt`` and ``.json``):

* a regular checkpoint (``kind="decouple"``) whose stored config names the new head, so
  ``model_from_checkpoint``, ``lowshot embed`` and ``lowshot eval`` use it unchanged;
* the balanced-test results of the decoupled AND the joint classifier: overall top-1,
  class-mean accuracy, many / medium / few-shot and a per-class table.

The reported numbers are computed by the head rebuilt from the checkpoint dict that is saved, so
file and report cannot disagree. ``evaluate_checkpoint`` gives the same metrics for any checkpoint
(joint or decoupled).
"""
from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, save_checkpoint, write_text_atomic, resolve_checkpoint_path
from ..config import Config
from ..data import build_dataset
from ..data.base import ImageDataset
from ..errors import ConfigError, DataError, LowshotError
from ..inference import extract_features
from ..models import Classifier, model_from_checkpoint
from ..utils import resolve_device
from .. import feature_cache as cache
from ..data.longtail import class_counts
from ..registry import Option, checked_call
from .methods import STAGE2_METHODS, Fit, RunOptions, ThresholdRule, create_stage2_method, stage2_method_options
from .metrics import GROUPS, shot_accuracy, shot_groups, thresholds_by_rank

OFFICIAL_THRESHOLDS = (100, 20)
THRESHOLD_RULES = typing.get_args(ThresholdRule)


# ----------------------------------------------------------------------------- options

def valid_options(method: str) -> dict[str, Option]:
    """Every option ``method`` accepts (its own, then the common ones), with default and help."""
    return {o.name: o for o in stage2_method_options(method)}


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- ``options``, checked by the method registry (unknown keys name the valid ones)."""
    return create_stage2_method(method, **options).options()


# ----------------------------------------------------------------------------- the source run

@dataclass
class Stage2Context:
    """A loaded checkpoint plus memoised datasets and (disk-cached) features of its splits."""

    path: Path
    ckpt: dict[str, Any]
    model: Classifier
    cfg: Config
    transform: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    root: str | None = None
    feature_batch_size: int = 256
    use_cache: bool = True
    log: Callable[[str], None] = print
    _datasets: dict[str, ImageDataset] = field(default_factory=dict)
    _features: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    extracted: list[str] = field(default_factory=list)  # splits computed (not read from cache)
    extract_seconds: float = 0.0  # time spent computing features (not reading the cache)

    @classmethod
    def open(cls, checkpoint: str | Path, *, device: str = "auto", root: str | None = None,
             feature_batch_size: int = 256, cache: bool = True,
             log: Callable[[str], None] = print) -> Stage2Context:
        from ..data.transforms import build_transform
        path = resolve_checkpoint_path(checkpoint)
        ckpt = load_checkpoint(path)
        model, cfg = model_from_checkpoint(ckpt)
        meta = ckpt["data"]
        transform = build_transform(False, meta["image_size"], meta["channels"], meta["mean"], meta["std"])
        dev = resolve_device(device)
        return cls(path, ckpt, model.to(dev).eval(), cfg, transform, dev, root, feature_batch_size, cache, log)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def class_names(self) -> list[str]:
        return list(self.ckpt["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.ckpt["class_names"])

    def dataset(self, split: str) -> ImageDataset:
        """A split of the checkpoint's dataset, checked against the checkpoint (classes, channels)."""
        if split not in self._datasets:
            d, meta = self.cfg.data, self.ckpt["data"]
            root = self.root if self.root is not None else d.root
            try:
                ds = build_dataset(d.name, split, root=root, image_size=d.image_size, download=False, **d.options)
            except LowshotError as err:
                raise type(err)(f"split {split!r} of the checkpoint's dataset {d.name!r}: {err}") from None
            if len(ds) == 0:
                raise DataError(f"dataset {d.name!r} split {split!r} is empty")
            if ds.channels != meta["channels"]:
                raise DataError(f"dataset {d.name!r} split {split!r} has {ds.channels}-channel images but "
                                f"{self.path} expects {meta['channels']}")
            if list(ds.class_names) != self.class_names:
                raise DataError(f"dataset {d.name!r} split {split!r} has classes {list(ds.class_names)[:5]}... "
                                f"but {self.path} was trained on {self.class_names[:5]}...")
            self._datasets[split] = ds
        return self._datasets[split]

    def features(self, split: str, backbone: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU features [N, D] and labels [N] of ``split`` (``backbone`` default: the checkpoint's)."""
        bb = self.model.backbone if backbone is None else backbone
        ds = self.dataset(split)
        d, meta = self.cfg.data, self.ckpt["data"]
        desc = {"backbone": self.cfg.model.backbone, "backbone_kwargs": self.cfg.model.backbone_kwargs,
                "data": {"name": d.name, "options": d.options, "image_size": d.image_size,
                         "root": str(self.root if self.root is not None else d.root)},
                "split": split, "normalise": {k: meta[k] for k in ("channels", "image_size", "mean", "std")}}
        key = cache.feature_key(bb.state_dict(), desc)
        if (split, key) not in self._features:
            def compute() -> tuple[torch.Tensor, torch.Tensor]:
                t0 = time.perf_counter()
                out = extract_features(bb, ds, self.transform, self.feature_batch_size, self.device)
                seconds = time.perf_counter() - t0
                self.extracted.append(split)
                self.extract_seconds += seconds
                self.log(f"features: {split} {tuple(out[0].shape)} extracted in {seconds:.1f}s")
                return out

            directory = self.run_dir / "features" if self.use_cache else None
            f, y, hit = cache.cached_features(directory, split, key, ds.labels, compute)
            if hit:
                self.log(f"features: {split} {tuple(f.shape)} from cache")
            self._features[(split, key)] = (f, y)
        return self._features[(split, key)]

    def train_counts(self, split: str) -> list[int]:
        return class_counts(self.dataset(split).labels, self.num_classes).tolist()


# ----------------------------------------------------------------------------- metrics

def shot_thresholds(train_counts: list[int], rule: str = "auto") -> dict[str, Any]:
    """Many/few thresholds and the rule used. ``auto``: the official >100 / <20 when every group
    gets a class, else by rank (top / bottom third of classes by training count)."""
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"thresholds rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    many, few = OFFICIAL_THRESHOLDS
    groups = set(shot_groups(train_counts, many, few))
    if rule == "rank" or (rule == "auto" and groups != set(GROUPS)):
        many, few = thresholds_by_rank(train_counts)
        used = "rank"
        text = f"by rank (top/bottom third of classes): many > {many}, few < {few} training images"
    else:
        used = "official"
        text = f"official: many > {many}, few < {few} training images"
    return {"rule": used, "requested": rule, "many": many, "few": few, "description": text}


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, train_counts: list[int],
                    class_names: list[str], thresholds: dict[str, Any]) -> dict[str, Any]:
    """Overall, class-mean, many/medium/few accuracies (percent) and the per-class rows."""
    res = shot_accuracy(logits, labels, train_counts, thresholds["many"], thresholds["few"])
    n_test = torch.bincount(torch.as_tensor(labels).long(), minlength=len(train_counts)).tolist()
    rows = [{"class": i, "name": class_names[i], "train_count": int(train_counts[i]), "test_count": int(n_test[i]),
             "accuracy": res["per_class"][i], "group": res["groups"][i]} for i in range(len(train_counts))]
    rows.sort(key=lambda r: (-r["train_count"], r["class"]))
    return {**{k: res[k] for k in ("all", "class_mean", *GROUPS)}, "per_class": rows}


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
    ctx = Stage2Context.open(checkpoint, device=opts["device"], root=opts["root"],
                             feature_batch_size=opts["feature_batch_size"], cache=opts["cache"], log=log)
    train_split = opts["train_split"] or ctx.cfg.data.train_split
    counts = ctx.train_counts(train_split)
    thr = shot_thresholds(counts, opts["thresholds"])
    f, y = ctx.features(split)
    metrics = evaluate_logits(_head_logits(ctx.model.head, f, ctx.device), y, counts, ctx.class_names, thr)
    return {"checkpoint": str(ctx.path), "kind": ctx.ckpt.get("kind", "train"), "method": ctx.ckpt.get("method", "joint"),
            "head": ctx.cfg.head.name, "dataset": ctx.cfg.data.name, "split": split, "train_split": train_split,
            "train_counts": counts, "thresholds": thr, "metrics": metrics}


# ----------------------------------------------------------------------------- decouple

def decouple(checkpoint: str | Path, method: str, *, out: str | Path | None = None,
             log: Callable[[str], None] = print, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Fit stage-2 classifier ``method`` on a joint checkpoint; write checkpoint + JSON; return
    ``(checkpoint_path, results)``. See ``valid_options(method)`` for the options."""
    name = STAGE2_METHODS.canonical(method)
    opts = resolve_options(name, options)
    ctx = Stage2Context.open(checkpoint, device=opts["device"], root=opts["root"],
                             feature_batch_size=opts["feature_batch_size"], cache=opts["cache"], log=log)
    train_split = opts["train_split"] or ctx.cfg.data.train_split
    opts["train_split"] = train_split
    out_path = Path(out) if out is not None else ctx.run_dir / f"decouple_{name}.pt"
    if out_path.resolve() == ctx.path.resolve():
        raise ConfigError(f"--out {out_path} would overwrite the source checkpoint")
    counts = ctx.train_counts(train_split)
    thr = shot_thresholds(counts, opts["thresholds"])

    t0, e0 = time.perf_counter(), ctx.extract_seconds
    fit: Fit = create_stage2_method(name, **opts).fit(ctx)
    fit_seconds = time.perf_counter() - t0 - (ctx.extract_seconds - e0)  # the method alone
    new = _decoupled_checkpoint(ctx, name, opts, fit)
    model, _ = model_from_checkpoint(new)  # what is saved is what is evaluated
    model = model.to(ctx.device).eval()
    test = opts["test_split"]
    tf, ty = ctx.features(test, backbone=model.backbone if fit.model_state is not None else None)
    jf, jy = ctx.features(test)
    results = {
        "method": name, "checkpoint": str(out_path), "source": str(ctx.path), "dataset": ctx.cfg.data.name,
        "train_split": train_split, "test_split": test, "train_counts": counts, "thresholds": thr,
        "options": opts, "info": fit.info, "fit_seconds": round(fit_seconds, 3),
        "feature_seconds": round(ctx.extract_seconds, 3), "features_extracted": list(ctx.extracted),
        "metrics": evaluate_logits(_head_logits(model.head, tf, ctx.device), ty, counts, ctx.class_names, thr),
        "joint": evaluate_logits(_head_logits(ctx.model.head, jf, ctx.device), jy, counts, ctx.class_names, thr),
        "joint_head": ctx.cfg.head.name,
    }
    new["results"] = _plain(results)
    save_checkpoint(new, out_path)
    write_text_atomic(out_path.with_suffix(".json"), _json(results))
    log(format_results(results))
    return out_path, results


def _decoupled_checkpoint(ctx: Stage2Context, method: str, opts: dict[str, Any], fit: Fit) -> dict[str, Any]:
    """Same plain-data format as a training checkpoint; config.head names the new head."""
    config = dict(ctx.ckpt["config"])
    config["head"] = {"name": fit.head_name, "margin": 0.0, "scale": None, "kwargs": dict(fit.head_kwargs)}
    src = ctx.ckpt
    out = {
        "kind": "decouple", "method": method,
        "model": fit.model_state if fit.model_state is not None else src["model"],
        "head": {k: v.detach().cpu().contiguous() for k, v in fit.head_state.items()},
        "config": config, "class_names": list(src["class_names"]), "data": dict(src["data"]),
        "epoch": src.get("epoch"), "step": src.get("step"),
        "source": str(ctx.path),
        "source_info": {"kind": src.get("kind", "train"), "method": src.get("method", "joint"),
                        "head": ctx.cfg.head.name, "epoch": src.get("epoch")},
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
    import json

    def strict(x: Any) -> Any:  # NaN (an empty group) is not JSON: write null
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, list):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(_plain(obj)), indent=1) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """``[(label, metrics), ...]`` -> overall / class-mean / many / medium / few columns."""
    width = max([len("method")] + [len(label) for label, _ in rows])
    lines = [f"{'method':<{width}}  {'overall':>7}  {'cls-mean':>8}  {'many':>6}  {'medium':>6}  {'few':>6}"]
    for label, m in rows:
        lines.append(f"{label:<{width}}  {_pct(m['all']):>7}  {_pct(m['class_mean']):>8}  {_pct(m['many']):>6}  "
                     f"{_pct(m['medium']):>6}  {_pct(m['few']):>6}")
    return "\n".join(lines)


def format_results(results: dict[str, Any]) -> str:
    """Summary table (joint vs decoupled) and per-class accuracies, as printed by ``decouple``."""
    thr = results["thresholds"]
    title = (f"decouple {results['method']} on {results['dataset']} {results['test_split']} "
             f"(source {results['source']})")
    head = [title, f"groups: {thr['description']}"]
    info = results.get("info") or {}
    if "tau" in info:
        head.append(f"tau = {info['tau']} ({info.get('tau_source')})")
    table = format_table([(f"joint ({results['joint_head']})", results["joint"]),
                          (results["method"], results["metrics"])])
    width = max(len("class"), *(len(str(r["name"])) for r in results["metrics"]["per_class"]))
    per = [f"{'class':<{width}}  {'train':>6}  {'group':<6}  {'joint':>6}  {results['method']:>8}"]
    joint_acc = {r["class"]: r["accuracy"] for r in results["joint"]["per_class"]}
    for r in results["metrics"]["per_class"]:
        per.append(f"{r['name']:<{width}}  {r['train_count']:>6}  {r['group']:<6}  {_pct(joint_acc[r['class']]):>6}  "
                   f"{_pct(r['accuracy']):>8}")
    return "\n".join(head + [table, ""] + per + [f"wrote {results['checkpoint']} (+ .json)"])


__all__ = [
    "Stage2Context",
    "decouple",
    "evaluate_checkpoint",
    "evaluate_logits",
    "format_results",
    "format_table",
    "resolve_options",
    "shot_thresholds",
    "valid_options",
]
