"""The few-shot protocols on a frozen run: the one place ``eval`` and ``sweep`` meta-test a checkpoint.

Features come from ``FrozenRun.features`` (cached, shared with every other tool); the fine-tune
head of the training head's family comes from ``method_kwargs_for_head``; ``evaluate`` solves
the episodes (split across ranks under torchrun). Training-time validation calls ``evaluate``
directly on the live model's features.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from ..fileio import write_text_atomic
from ..errors import ConfigError
from ..inference import FrozenRun
from .api import evaluate, method_kwargs_for_head
from .generalized import (BaseClassifier, GeneralizedReport, evaluate_generalized, format_generalized_table,
                          split_heldout)


def evaluate_run(run: FrozenRun, split: str, *, way: int, shots: Sequence[int], query: int, episodes: int,
                 method: str, seed: int, options: dict[str, Any] | None = None,
                 within: str | None = None) -> list[dict[str, Any]]:
    """One result per shot (``{mean, ci95, std, accuracies, way, shot, ...}``) on ``split``'s classes.

    ``within``: a class-metadata key (e.g. ``alphabet``): every episode draws its classes from one
    value of it; an unknown key fails before any feature is extracted.
    """
    groups = run.groups(split, within)
    feats, labels = run.features(split)
    names = run.dataset(split).class_names
    kw = method_kwargs_for_head(run.head_name, method, dict(options or {}))
    results = []
    for shot in shots:
        res = evaluate(feats, labels, way=way, shot=shot, query=query, episodes=episodes, method=method, seed=seed,
                       class_names=names, groups=groups, device=run.device, **kw)
        res["accuracies"] = [float(a) for a in res["accuracies"]]
        results.append(res)
    return results


def run_generalized_eval(checkpoint: str | Path, *, way: int | None = None, shots: Sequence[int] | None = None,
                         query: int | None = None, base_query: int | None = None, episodes: int | None = None,
                         val_episodes: int | None = None, calibrations: Sequence[str] = ("none",),
                         method: str | None = None, seed: int | None = None, base_val_fraction: float = 0.5,
                         options: dict[str, Any] | None = None, device: str = "auto",
                         out: str | Path | None = None, log: Any = print) -> GeneralizedReport:
    """``lowshot eval --generalized``: a checkpoint's head as the base classifier, its splits as data.

    Splits from the checkpoint config: novel episodes from ``data.novel_split``, validation
    episodes from ``data.val_split``; the held-out base images (``data.test_split``, e.g.
    ``base_test``) are split per class (``split_heldout``, ``base_val_fraction``) into the base
    queries of the validation and of the test episodes; ``data.train_split`` (base training
    images) only for ``method=ncm``. Unset protocol values come from the config's ``eval``
    section. ``options``: ``criterion``, ``chunk_size``, ``ncm_metric`` and ``FinetuneConfig``
    fields (``steps``, ``lr``, ...). Writes the JSON atomically (default: next to the checkpoint).
    """
    run = FrozenRun.open(checkpoint, device=device)
    ckpt_path, model, cfg = run.path, run.model, run.config
    e, d = cfg.eval, cfg.data
    for key, split in (("data.novel_split", d.novel_split), ("data.test_split", d.test_split)):
        if not split:
            raise ConfigError(f"generalized eval needs {key} in the checkpoint's config (held-out base images "
                              f"and novel classes)")
    need_val = any(c != "none" for c in calibrations)
    if need_val and not d.val_split:
        raise ConfigError("calibration needs validation classes: the checkpoint's config has no data.val_split")
    opts = dict(options or {})
    kw = {k: opts.pop(k) for k in ("criterion", "chunk_size", "ncm_metric") if k in opts}
    method = method or "auto"
    dev = run.device

    def feats(split: str) -> tuple[Tensor, Tensor, list[str]]:
        x, y = run.features(split)
        log(f"features: {split} split, {x.shape[0]} images, {len(set(y.tolist()))} classes")
        return x, y, list(run.dataset(split).class_names)

    base_x, base_y, base_names = feats(d.test_split)
    val_idx, test_idx = split_heldout(base_y, base_val_fraction, 0)
    novel_x, novel_y, _ = feats(d.novel_split)
    arrays: dict[str, Any] = {}
    if need_val:
        vx, vy, _ = feats(d.val_split)
        arrays.update(val_features=vx, val_labels=vy, base_val_features=base_x[val_idx],
                      base_val_labels=base_y[val_idx])
    if method == "ncm":
        tx, ty, _ = feats(d.train_split)
        arrays.update(base_train_features=tx, base_train_labels=ty)
        clf = None
    else:
        clf = BaseClassifier.from_head(model.head)
    report = evaluate_generalized(
        base_x[test_idx], base_y[test_idx], novel_x, novel_y, base_classifier=clf,
        way=e.way if way is None else way, shots=list(e.shots if shots is None else shots),
        query=e.query if query is None else query, base_query=base_query,
        episodes=e.episodes if episodes is None else episodes, val_episodes=val_episodes, calibrations=list(calibrations),
        method=method, seed=e.seed if seed is None else seed, finetune=opts or None, device=dev,
        source={"checkpoint": str(ckpt_path), "dataset": d.name, "head": cfg.head.name,
                "margin": cfg.head.margin, "novel_split": d.novel_split, "val_split": d.val_split,
                "base_split": d.test_split, "base_val_fraction": base_val_fraction}, **arrays, **kw)
    log(format_generalized_table(report))
    out_path = Path(out) if out else ckpt_path.parent / f"generalized_{ckpt_path.stem}_{report.method}.json"
    write_text_atomic(out_path, json.dumps(report.to_dict(), indent=1))
    log(f"wrote {out_path}")
    return report
