"""The few-shot protocol on a frozen run: the one place ``eval`` and ``sweep`` meta-test a checkpoint.

Features come from ``FrozenRun.features`` (cached, shared with every other tool); the fine-tune
head of the training head's family comes from ``method_kwargs_for_head``; ``evaluate`` solves
the episodes (split across ranks under torchrun). Training-time validation calls ``evaluate``
directly on the live model's features.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..inference import FrozenRun
from .api import evaluate, method_kwargs_for_head


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
