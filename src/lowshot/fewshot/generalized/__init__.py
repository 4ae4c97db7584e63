"""Generalized few-shot: base and novel classes scored together, with decoupled calibration.

Protocol (Gidaris & Komodakis, CVPR 2018; Ye et al., IJCV 2021, "Learning Adaptive Classifiers
Synthesis for Generalized Few-Shot Learning"; the seen-unseen curve of Chao et al., ECCV 2016):

* The trained head is the base classifier (``C`` rows). Each episode (``sample_episodes`` on the
  novel split) adds ``way`` novel classes with ``shot`` supports. Queries: ``query`` per novel
  class AND ``base_query`` held-out base images (default ``way * query``, i.e. as many base as
  novel queries), spread as evenly as possible over the base classes (``sample_base_queries``).
* Joint label space: all ``C`` base classes + the episode's ``way`` novel classes.
* Novel rows from the support (``method``): ``imprint`` = normalised mean of the normalised
  support features (Qi et al., CVPR 2018), the default for cosine-family heads; ``finetune`` =
  imprinted init, then the Negative-Margin fine-tune schedule (``FinetuneConfig``: SGD lr 0.01,
  momentum 0.9, dampening 0.9, wd 1e-3, batches of 4, 150 / 600 steps) on the novel rows only,
  cross-entropy in the joint space, base rows frozen (the default for linear-family heads);
  ``ncm`` = nearest class mean over the base-class means (from base training features) plus the
  support means (cosine on centred, L2-normalised features, as ``heads.ncm``).
* Calibration (fitted on validation episodes built from the ``val`` classes and a validation
  part of the held-out base images, never from the test episodes):
  ``none``; ``tau_norm`` = ``w / |w|^tau`` on every row of the joint weight matrix, biases
  dropped (Kang et al. 2020, ``longtail.tau_normalize``), tau from ``DEFAULT_TAU_GRID``;
  ``scale`` = LWS-style, one scale for the base scores and one for the novel scores, learned by
  class-group-balanced cross-entropy on the validation queries; ``bias`` = calibrated stacking
  (Chao et al.): a constant ``gamma`` subtracted from every base score.
  Selection criterion (tau, gamma): mean per-episode harmonic mean on validation (``criterion``).
  For cosine heads, imprinting and cosine NCM every row has unit norm, so ``tau_norm`` equals
  ``none`` there (reported, not hidden).
* Metrics per episode, then mean and 95 % CI (``api.summarize``): ``base`` / ``novel`` (accuracy
  of the base / novel queries in the joint space), ``joint`` (all queries), ``hmean`` (harmonic
  mean of base and novel), ``delta`` (mean drop from the separate setting:
  ``((base_only - base) + (novel_only - novel)) / 2``, where ``base_only`` / ``novel_only`` are
  the accuracies with the argmax restricted to the base / the novel classes), and ``ausuc`` (area
  under the novel-vs-base accuracy curve traced by sweeping gamma from -inf to +inf, in % of
  the unit square). All in percent.

Batched: episodes are processed in chunks (``chunk_size``) with one tensor op per step; no
Python loop over episodes. Ties between the best base and best novel score go to the base
class (``argmax`` over ``[base, novel]`` takes the first maximum); AUSUC counts them half.
"""

from .classifier import BaseClassifier, finetune_novel_rows
from .constants import CALIBRATIONS, CRITERIA, CURVE_POINTS, KINDS, METHODS, METRICS
from .evaluate import evaluate_generalized, fit_group_scales
from .metrics import (Reduced, criterion_at, episode_metrics, reduce_scores, sample_base_queries, seen_unseen_curve,
                      split_heldout)
from .results import GeneralizedReport, GeneralizedResult, Stat, format_generalized_table

__all__ = ["BaseClassifier", "CALIBRATIONS", "CRITERIA", "CURVE_POINTS", "GeneralizedReport", "GeneralizedResult",
           "KINDS", "METHODS", "METRICS", "Reduced", "Stat", "criterion_at", "episode_metrics", "evaluate_generalized",
           "finetune_novel_rows", "fit_group_scales", "format_generalized_table", "reduce_scores",
           "sample_base_queries", "seen_unseen_curve", "split_heldout"]
