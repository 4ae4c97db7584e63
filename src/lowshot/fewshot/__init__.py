"""Few-shot meta-testing on frozen features, all episodes solved at once.

``evaluate(features, labels, way=5, shot=1, method="finetune")`` samples reproducible
episodes (``sample_episodes``) and runs a registered method (``EVALUATORS``:
``finetune`` — the Baseline++ / Negative-Margin fine-tune protocol, solved exactly in each
episode's support span; ``ncm``/``protonet``; ``logreg``).  See docs/fewshot.md.
``evaluate_generalized`` scores base and novel classes together (docs/generalized.md).
``run_features_eval`` / ``run_features_generalized`` evaluate a features file (any model's).
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
from .feature_files import FeatureFile, load_feature_file, run_features_eval, run_features_generalized
from .finetune import FinetuneConfig
from .generalized import BaseClassifier, GeneralizedReport, evaluate_generalized

__all__ = [
    "BaseClassifier",
    "FeatureFile",
    "load_feature_file",
    "run_features_eval",
    "run_features_generalized",
    "GeneralizedReport",
    "evaluate_generalized",
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
