"""Long-tailed recognition: Decoupling Representation and Classifier (Kang et al., ICLR 2020).

Long-tailed subsets (``make_longtail``, the ``*_lt`` datasets) and the samplers are data loading:
``lowshot.data.longtail``, ``lowshot.data.samplers`` (re-exported here). This package holds stage 2:
``decouple`` the algorithms on tensors (cRT, tau-norm with automatic tau, LWS), ``stage2`` the method
contract and ``decouple`` / ``evaluate_checkpoint`` on a trained checkpoint (CLI ``lowshot decouple``),
``methods`` the four registered methods, ``metrics`` the many / medium / few-shot evaluation.
"""
from __future__ import annotations

from .decouple import apply_lws, learn_lws, retrain_crt, retrain_crt_on_images, select_tau, tau_normalize
from ..data.longtail import balanced_split, class_counts, class_indices, longtail_counts, make_longtail
from . import methods  # noqa: F401  (registers crt, tau_norm, lws, ncm)
from .metrics import (format_per_class_table, per_class_table, shot_accuracy, shot_groups,
                      thresholds_by_rank)
from ..data.samplers import SAMPLERS, LongTailSampler, build_sampler, create_sampler, list_samplers, register_sampler
from .stage2 import (STAGE2_METHODS, Stage2Method, create_stage2_method, evaluate_checkpoint, list_stage2_methods,
                     register_stage2_method)
from .stage2 import decouple as decouple_checkpoint

__all__ = ["make_longtail", "longtail_counts", "balanced_split", "class_counts", "class_indices",
           "SAMPLERS", "LongTailSampler", "build_sampler", "create_sampler", "list_samplers", "register_sampler",
           "shot_accuracy", "shot_groups", "thresholds_by_rank", "per_class_table", "format_per_class_table",
           "tau_normalize", "select_tau", "learn_lws", "apply_lws", "retrain_crt", "retrain_crt_on_images",
           "STAGE2_METHODS", "Stage2Method", "create_stage2_method", "list_stage2_methods",
           "register_stage2_method", "decouple_checkpoint", "evaluate_checkpoint"]
