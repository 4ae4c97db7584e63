"""Records of sweeps: one point (``result.json``) and the sweep (``sweep.json``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._fields import NUM
from ._fields import get as _get
from ._fields import num as _num
from ._fields import obj as _obj
from .fewshot import PhiSplit, phi_splits


@dataclass
class SweepPoint:
    """``<sweep>/<point>/result.json`` (and one entry of ``sweep.json["points"]``, without ``config``).

    ``fewshot``: protocol label (``5x1``, ``20x1@alphabet``; shot-only ``"1"`` in sweeps written before
    protocols) -> ``{"mean", "ci95", "way", "shot", "within"}``. ``base_acc``: held-out base-class
    accuracy at the evaluated checkpoint; ``held_out_split`` / ``held_out_acc``: the accuracy on
    ``data.test_split`` whatever its name (long-tail configs have no base split; older sweeps lack
    both). A diverged point has ``error`` and only name, point, run_dir, fewshot, phi."""
    name: str
    point: dict[str, Any]
    fewshot: dict[str, dict[str, Any]]
    phi: dict[str, PhiSplit]
    run_dir: str | None = None
    error: str | None = None
    checkpoint: str | None = None
    epoch: int | None = None
    base_acc: float | None = None
    final_base_acc: float | None = None
    val_mean: float | None = None
    held_out_split: str | None = None
    held_out_acc: float | None = None
    protocol: dict[str, Any] | None = None
    config: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, d: Any, where: str = "result.json") -> SweepPoint:
        d = _obj(d, where)
        name, point = _get(d, "name", where, str), _get(d, "point", where, dict)
        fewshot = _get(d, "fewshot", where, dict)
        for k, v in fewshot.items():
            e = _obj(v, f"{where} fewshot.{k}")
            _get(e, "mean", f"{where} fewshot.{k}", NUM)
            _get(e, "ci95", f"{where} fewshot.{k}", NUM)
        opt = dict(optional=True)
        return cls(name=name, point=point, fewshot=dict(fewshot),
                   phi=phi_splits(d, "phi", where), run_dir=_get(d, "run_dir", where, str, **opt),
                   error=_get(d, "error", where, str, **opt), checkpoint=_get(d, "checkpoint", where, str, **opt),
                   epoch=_get(d, "epoch", where, int, **opt), base_acc=_num(d, "base_acc", where, **opt),
                   final_base_acc=_num(d, "final_base_acc", where, **opt),
                   val_mean=_num(d, "val_mean", where, **opt),
                   held_out_split=_get(d, "held_out_split", where, str, **opt),
                   held_out_acc=_num(d, "held_out_acc", where, **opt),
                   protocol=_get(d, "protocol", where, dict, **opt), config=_get(d, "config", where, dict, **opt))

    def to_dict(self, *, config: bool = True) -> dict[str, Any]:
        head = {"name": self.name, "point": dict(self.point), "run_dir": self.run_dir}
        phi = {k: v.to_dict() for k, v in self.phi.items()}
        if self.error is not None:
            return {**head, "error": self.error, "fewshot": dict(self.fewshot), "phi": phi}
        out = {**head, "checkpoint": self.checkpoint, "epoch": self.epoch, "base_acc": self.base_acc,
               "final_base_acc": self.final_base_acc, "val_mean": self.val_mean,
               "held_out_split": self.held_out_split, "held_out_acc": self.held_out_acc,
               "fewshot": dict(self.fewshot), "phi": phi, "protocol": self.protocol}
        return {**out, "config": self.config} if config and self.config is not None else out


@dataclass
class SweepSummary:
    """``sweep.json``: the grid, the figure's x axis, every finished (or diverged) point. Seeded
    sweeps add ``seeds`` and ``aggregate`` (mean / std per point, ``report.seeds.aggregate_seeds``,
    written with the summary table)."""
    grid: dict[str, list[Any]]
    axis: str | None
    points: list[SweepPoint]
    seeds: list[int] | None = None
    aggregate: list[dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "sweep.json") -> SweepSummary:
        d = _obj(d, where)
        points = _get(d, "points", where, list)
        return cls(grid=_get(d, "grid", where, dict), axis=_get(d, "axis", where, str, none=True),
                   points=[SweepPoint.from_dict(p, f"{where} points[{i}]") for i, p in enumerate(points)],
                   seeds=_get(d, "seeds", where, list, optional=True),
                   aggregate=_get(d, "aggregate", where, list, optional=True))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"grid": {k: list(v) for k, v in self.grid.items()}, "axis": self.axis,
                               "points": [p.to_dict(config=False) for p in self.points]}
        if self.seeds is not None:
            out["seeds"] = list(self.seeds)
        if self.aggregate is not None:
            out["aggregate"] = self.aggregate
        return out

    def point_dicts(self) -> list[dict[str, Any]]:
        """The points as the sweep tables take them."""
        return [p.to_dict(config=False) for p in self.points]
