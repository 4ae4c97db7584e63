"""Records of few-shot evaluation (``eval*.json``) and of phi (``analysis.json``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import DataError
from ._fields import NUM
from ._fields import get as _get
from ._fields import num as _num
from ._fields import obj as _obj


@dataclass
class FewShotAccuracy:
    """One protocol of an eval record: what ``fewshot.evaluate`` returns (``accuracies`` per episode).
    ``within`` is True when episodes were drawn inside groups (the record names the key)."""
    way: int
    shot: int
    mean: float
    ci95: float
    method: str
    episodes: int
    std: float | None = None
    query: int | None = None
    seed: int | None = None
    within: bool | None = None
    seconds: float | None = None
    accuracies: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FewShotAccuracy:
        d = _obj(d, where)
        return cls(way=_get(d, "way", where, int), shot=_get(d, "shot", where, int),
                   mean=float(_get(d, "mean", where, NUM)), ci95=float(_get(d, "ci95", where, NUM)),
                   method=_get(d, "method", where, str), episodes=_get(d, "episodes", where, int),
                   std=_num(d, "std", where, optional=True), query=_get(d, "query", where, int, optional=True),
                   seed=_get(d, "seed", where, int, optional=True),
                   within=_get(d, "within", where, bool, optional=True),
                   seconds=_num(d, "seconds", where, optional=True),
                   accuracies=list(_get(d, "accuracies", where, list, optional=True, default=[])))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.ci95, "std": self.std, "way": self.way, "shot": self.shot,
                "query": self.query, "episodes": self.episodes, "method": self.method, "seed": self.seed,
                "within": self.within, "seconds": self.seconds, "accuracies": list(self.accuracies)}


@dataclass
class EvalResult:
    """``eval*.json``. Two writers: on a checkpoint (``checkpoint``, ``split``, ``dataset``) or on a
    features file (``features``, ``head``, ``options``); both write ``within`` (the group key or null)
    and ``results`` (one :class:`FewShotAccuracy` per shot). The other writer's keys are None."""
    results: list[FewShotAccuracy]
    within: str | None = None
    checkpoint: str | None = None
    split: str | None = None
    dataset: str | None = None
    features: str | None = None
    head: str | None = None
    options: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "eval result") -> EvalResult:
        d = _obj(d, where)
        if "checkpoint" not in d and "features" not in d:
            raise DataError(f"{where}: not a lowshot eval result (neither 'checkpoint' nor 'features' key)")
        rows = _get(d, "results", where, list)
        return cls(results=[FewShotAccuracy.from_dict(r, f"{where} results[{i}]") for i, r in enumerate(rows)],
                   within=_get(d, "within", where, str, optional=True),
                   checkpoint=_get(d, "checkpoint", where, str, optional=True),
                   split=_get(d, "split", where, str, optional=True),
                   dataset=_get(d, "dataset", where, str, optional=True),
                   features=_get(d, "features", where, str, optional=True),
                   head=_get(d, "head", where, str, optional=True),
                   options=_get(d, "options", where, dict, optional=True))

    def to_dict(self) -> dict[str, Any]:
        if self.features is not None:
            head = {"features": self.features, "head": self.head, "within": self.within, "options": self.options}
        else:
            head = {"checkpoint": self.checkpoint, "split": self.split, "dataset": self.dataset,
                    "within": self.within}
        return {**head, "results": [r.to_dict() for r in self.results]}


# ----------------------------------------------------------------------------- phi

@dataclass
class PhiSplit:
    """phi of one split (``analysis.discriminability`` + what it was computed on): the headline
    ``phi`` (None = infinite) in ``space``, and both spaces' statistics (``raw``, ``l2``: phi, inter,
    intra, num_classes, num_samples, ...). ``class_names`` only in ``analysis.json``."""
    phi: float | None
    space: str
    split: str | None = None
    raw: dict[str, Any] | None = None
    l2: dict[str, Any] | None = None
    class_names: list[str] | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PhiSplit:
        d = _obj(d, where)
        return cls(phi=_num(d, "phi", where), space=_get(d, "space", where, str),
                   split=_get(d, "split", where, str, optional=True), raw=_get(d, "raw", where, dict, optional=True),
                   l2=_get(d, "l2", where, dict, optional=True),
                   class_names=_get(d, "class_names", where, list, optional=True))

    def to_dict(self) -> dict[str, Any]:
        out = {"phi": self.phi, "space": self.space, "raw": self.raw, "l2": self.l2, "split": self.split}
        return out if self.class_names is None else {**out, "class_names": list(self.class_names)}

    def stats(self) -> dict[str, Any]:
        """The statistics of the headline space (empty when not stored)."""
        return (self.l2 if self.space == "l2" else self.raw) or {}


def phi_splits(d: Mapping[str, Any], key: str, where: str) -> dict[str, PhiSplit]:
    return {str(k): PhiSplit.from_dict(v, f"{where} {key}.{k}") for k, v in _get(d, key, where, dict).items()}


@dataclass
class PhiAnalysis:
    """``analysis.json`` of ``lowshot analyze``: phi per split kind (base / novel) and the projection
    PNG file names (next to the JSON) per kind."""
    splits: dict[str, PhiSplit]
    projections: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None
    epoch: int | None = None
    dataset: str | None = None
    backbone: str | None = None
    head: str | None = None
    margin: float | None = None
    headline_space: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "analysis.json") -> PhiAnalysis:
        d = _obj(d, where)
        return cls(splits=phi_splits(d, "splits", where),
                   projections={str(k): str(v) for k, v in
                                (_get(d, "projections", where, dict, optional=True) or {}).items()},
                   checkpoint=_get(d, "checkpoint", where, str, optional=True),
                   epoch=_get(d, "epoch", where, int, optional=True),
                   dataset=_get(d, "dataset", where, str, optional=True),
                   backbone=_get(d, "backbone", where, str, optional=True),
                   head=_get(d, "head", where, str, optional=True), margin=_num(d, "margin", where, optional=True),
                   headline_space=_get(d, "headline_space", where, str, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "dataset": self.dataset,
                "backbone": self.backbone, "head": self.head, "margin": self.margin,
                "headline_space": self.headline_space, "splits": {k: v.to_dict() for k, v in self.splits.items()},
                "projections": dict(self.projections)}
