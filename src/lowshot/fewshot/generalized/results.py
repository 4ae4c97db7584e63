"""What ``evaluate_generalized`` returns and ``lowshot eval --generalized`` writes: strict dataclasses."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import DataError

from .constants import METRICS

# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Stat:
    mean: float
    ci95: float


@dataclass
class GeneralizedResult:
    """One (shot, calibration) cell. ``chosen``: the fitted parameters (tau / gamma / scales)."""

    shot: int
    calibration: str
    base: Stat
    novel: Stat
    joint: Stat
    hmean: Stat
    delta: Stat
    ausuc: Stat
    base_only: Stat
    novel_only: Stat
    chosen: dict[str, float]
    val_criterion: float | None
    curve: dict[str, list[float]]          # gamma, base, novel (means over test episodes)
    per_episode: dict[str, list[float]] = field(repr=False, default_factory=dict)


@dataclass
class GeneralizedReport:
    """What ``evaluate_generalized`` returns and ``lowshot eval --generalized`` writes as JSON."""

    way: int
    query: int
    base_query: int
    episodes: int
    val_episodes: int
    seed: int
    method: str
    classifier: str                    # base classifier kind: cosine / linear / ncm
    num_base_classes: int
    criterion: str
    results: list[GeneralizedResult]
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "generalized", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneralizedReport:
        """Strict reader: a missing key is a DataError naming it."""
        try:
            if d["kind"] != "generalized":
                raise DataError(f"not a generalized few-shot result (kind={d['kind']!r})")
            results = [GeneralizedResult(
                shot=int(r["shot"]), calibration=str(r["calibration"]),
                **{k: Stat(float(r[k]["mean"]), float(r[k]["ci95"])) for k in METRICS},
                chosen=dict(r["chosen"]), val_criterion=r["val_criterion"], curve=dict(r["curve"]),
                per_episode=dict(r["per_episode"])) for r in d["results"]]
            return cls(way=int(d["way"]), query=int(d["query"]), base_query=int(d["base_query"]),
                       episodes=int(d["episodes"]), val_episodes=int(d["val_episodes"]), seed=int(d["seed"]),
                       method=str(d["method"]), classifier=str(d["classifier"]),
                       num_base_classes=int(d["num_base_classes"]), criterion=str(d["criterion"]),
                       results=results, source=dict(d["source"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"generalized result lacks key {e}") from None


def format_generalized_table(report: GeneralizedReport, digits: int = 2) -> str:
    """Markdown table: one row per shot x calibration, ``mean ± ci95`` per metric."""
    head = ("| shot | calibration | base | novel | joint | hmean | delta | AUSUC | base only | novel only "
            "| chosen on val |")
    rule = "|" + "---|" * 11
    rows = []
    for r in report.results:
        cells = [f"{getattr(r, k).mean:.{digits}f} ± {getattr(r, k).ci95:.{digits}f}" for k in METRICS]
        chosen = ", ".join(f"{k}={v:.4g}" for k, v in r.chosen.items()) or "-"
        rows.append(f"| {r.shot} | {r.calibration} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join([head, rule, *rows])
