"""Long-tailed recognition: Decoupling Representation and Classifier (Kang et al., ICLR 2020).

``make`` builds long-tailed subsets, ``lowshot.data.samplers`` the stage-1/stage-2 sampling strategies,
``decouple`` the stage-2 classifiers (cRT, tau-norm with automatic tau, LWS, NCM), ``metrics``
the many / medium / few-shot evaluation, and ``stage2`` runs a method on a trained checkpoint
(``decouple`` / ``evaluate_checkpoint``; CLI ``lowshot decouple``), writing a new checkpoint. Importing this package registers the datasets
``fashion_mnist_lt``, ``cifar10_lt`` and ``cifar100_lt``.
"""
from __future__ import annotations

from .decouple import apply_lws, learn_lws, retrain_crt, retrain_crt_on_images, select_tau, tau_normalize
from ..data.longtail import balanced_split, class_counts, class_indices, longtail_counts, make_longtail
from .methods import (METHODS, STAGE2_METHODS, Stage2Method, create_stage2_method, list_stage2_methods,
                      register_stage2_method)
from .metrics import (format_per_class_table, per_class_table, shot_accuracy, shot_groups,
                      thresholds_by_rank)
from ..data.samplers import SAMPLERS, LongTailSampler, build_sampler, create_sampler, list_samplers, register_sampler
from .stage2 import decouple as decouple_checkpoint
from .stage2 import evaluate_checkpoint

__all__ = ["make_longtail", "longtail_counts", "balanced_split", "class_counts", "class_indices",
           "SAMPLERS", "LongTailSampler", "build_sampler", "create_sampler", "list_samplers", "register_sampler",
           "shot_accuracy", "shot_groups", "thresholds_by_rank", "per_class_table", "format_per_class_table",
           "tau_normalize", "select_tau", "learn_lws", "apply_lws", "retrain_crt", "retrain_crt_on_images",
           "METHODS", "STAGE2_METHODS", "Stage2Method", "create_stage2_method", "list_stage2_methods",
           "register_stage2_method", "decouple_checkpoint", "evaluate_checkpoint"]
