"""Names of the generalized few-shot options and metrics (shared by the evaluator and its readers)."""
from __future__ import annotations

CALIBRATIONS = ("none", "tau_norm", "scale", "bias")
METHODS = ("auto", "imprint", "finetune", "ncm")
KINDS = ("cosine", "linear", "ncm")
METRICS = ("base", "novel", "joint", "hmean", "delta", "ausuc", "base_only", "novel_only")
CRITERIA = ("hmean", "joint")
CURVE_POINTS = 64
