"""Records of long-tail stage-2 runs (``decouple_<method>.json``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from ._fields import NUM
from ._fields import get as _get
from ._fields import num as _num
from ._fields import obj as _obj

GROUPS = ("many", "medium", "few")


@dataclass
class LongTailMetrics:
    """Accuracies (percent; None = an empty group) of one classifier on the balanced test split:
    ``all`` over images, ``class_mean``, many / medium / few, and per-class rows (class, name,
    train_count, test_count, accuracy, group)."""
    all: float | None
    class_mean: float | None
    many: float | None
    medium: float | None
    few: float | None
    per_class: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LongTailMetrics:
        d = _obj(d, where)
        rows = _get(d, "per_class", where, list, optional=True, default=[])
        for i, r in enumerate(rows):
            _num(_obj(r, f"{where} per_class[{i}]"), "accuracy", f"{where} per_class[{i}]")
            _get(r, "train_count", f"{where} per_class[{i}]", int)
        return cls(all=_num(d, "all", where), class_mean=_num(d, "class_mean", where),
                   **{g: _num(d, g, where) for g in GROUPS}, per_class=list(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"all": self.all, "class_mean": self.class_mean, "many": self.many, "medium": self.medium,
                "few": self.few, "per_class": list(self.per_class)}


@dataclass
class DecoupleResult:
    """``decouple_<method>.json`` of ``lowshot decouple`` (``longtail.stage2.decouple``): the new
    classifier's ``metrics``, the stage-1 classifier's ``joint`` metrics on the same split, and the
    method's ``info`` (tau-norm: ``tau``, ``tau_curve`` = [[tau, val acc], ...], ``test_curve``)."""
    method: str
    metrics: LongTailMetrics
    joint: LongTailMetrics | None = None
    joint_head: str | None = None
    checkpoint: str | None = None
    source: str | None = None
    dataset: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    train_counts: list[int] = field(default_factory=list, repr=False)
    thresholds: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float | None = None
    feature_seconds: float | None = None
    features_extracted: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: str = "decouple result") -> DecoupleResult:
        d = _obj(d, where)
        opt = dict(optional=True)
        joint = d.get("joint")
        return cls(method=_get(d, "method", where, str), metrics=LongTailMetrics.from_dict(
                       _get(d, "metrics", where, dict), f"{where} metrics"),
                   joint=None if joint is None else LongTailMetrics.from_dict(joint, f"{where} joint"),
                   joint_head=_get(d, "joint_head", where, str, **opt),
                   checkpoint=_get(d, "checkpoint", where, str, **opt), source=_get(d, "source", where, str, **opt),
                   dataset=_get(d, "dataset", where, str, **opt), train_split=_get(d, "train_split", where, str, **opt),
                   test_split=_get(d, "test_split", where, str, **opt),
                   train_counts=_get(d, "train_counts", where, list, **opt, default=[]),
                   thresholds=_get(d, "thresholds", where, dict, **opt, default={}),
                   options=_get(d, "options", where, dict, **opt, default={}),
                   info=_get(d, "info", where, dict, **opt, default={}),
                   fit_seconds=_num(d, "fit_seconds", where, **opt),
                   feature_seconds=_num(d, "feature_seconds", where, **opt),
                   features_extracted=_get(d, "features_extracted", where, list, **opt, default=[]))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "checkpoint": self.checkpoint, "source": self.source,
                "dataset": self.dataset, "train_split": self.train_split, "test_split": self.test_split,
                "train_counts": list(self.train_counts), "thresholds": dict(self.thresholds),
                "options": dict(self.options), "info": dict(self.info), "fit_seconds": self.fit_seconds,
                "feature_seconds": self.feature_seconds, "features_extracted": list(self.features_extracted),
                "metrics": self.metrics.to_dict(), "joint": None if self.joint is None else self.joint.to_dict(),
                "joint_head": self.joint_head}

    @property
    def tau(self) -> float | None:
        """The tau of tau-normalisation (None for other methods)."""
        tau = self.info.get("tau")
        return float(tau) if isinstance(tau, NUM) and not isinstance(tau, bool) else None

    def tau_curves(self) -> list[tuple[str, list[tuple[float, float]]]]:
        """``[("val", points), ("test", points)]`` as present: the curve that selected tau and the
        diagnostic curve on the test split, each sorted by tau."""
        out = []
        for name, key in (("val", "tau_curve"), ("test", "test_curve")):
            pts = self.info.get(key) or []
            try:
                curve = sorted((float(t), float(a)) for t, a in pts)
            except (TypeError, ValueError):
                raise DataError(f"decouple result info.{key}: expected [[tau, accuracy], ...]") from None
            if curve and all(math.isfinite(t) and math.isfinite(a) for t, a in curve):
                out.append((name, curve))
        return out
