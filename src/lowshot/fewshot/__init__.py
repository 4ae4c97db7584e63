"""Few-shot meta-testing on frozen features, all episodes solved at once.

``evaluate(features, labels, way=5, shot=1, method="finetune")`` samples reproducible
episodes (``sample_episodes``) and runs a registered method (``EVALUATORS``:
``finetune`` — the Baseline++ / Negative-Margin fine-tune protocol, solved exactly in each
episode's support span; ``ncm``/``protonet``; ``logreg``).  See docs/fewshot.md.
This package's namespace is the pure-tensor core (episodes, evaluators, ``evaluate``), which
training-time validation uses too. Built on it, one layer up: ``fewshot.protocol`` (a checkpoint's
splits through ``FrozenRun``), ``fewshot.feature_files`` (``eval --features``, any model's
features) and ``fewshot.generalized`` (base and novel classes scored together, docs/generalized.md).
"""
from __future__ import annotations

from .api import evaluate, evaluate_many, format_table, method_kwargs_for_head, summarize
from .episodes import episode_labels, sample_episodes
from .evaluators import (
    EVALUATORS,
    FewShotMethod,
    Finetune,
    LogisticRegression,
    NearestClassMean,
    create_evaluator,
    list_evaluators,
    register_evaluator,
)
from .finetune import FinetuneConfig

__all__ = [
    "method_kwargs_for_head",
    "EVALUATORS",
    "FewShotMethod",
    "Finetune",
    "FinetuneConfig",
    "LogisticRegression",
    "NearestClassMean",
    "create_evaluator",
    "episode_labels",
    "evaluate",
    "evaluate_many",
    "format_table",
    "list_evaluators",
    "register_evaluator",
    "sample_episodes",
    "summarize",
]
