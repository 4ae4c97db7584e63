"""Sweep summaries: the table (one row per run, or mean ± std per grid point over seeds), the
margin effect and the figure, as ``sweep.md`` / ``sweep.png`` and in the HTML report.

``lowshot.analysis.sweep.run_sweep`` trains, evaluates and writes the results (``result.json``,
``sweep.json``); :func:`write_summary` renders them (the ``lowshot sweep`` command and the demo
call it, see ``lowshot.pipelines.sweep_with_summary``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..results import Protocol, SweepSummary, fewshot_items, parse_protocol
from .html import markdown_table
from .seeds import accuracy_column, aggregate_seeds, is_seeded, margin_effect


def _pct(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2f}"


def _num(x: Any) -> str:
    if x is None:
        return "inf"
    return f"{float(x):.4g}" if math.isfinite(float(x)) else "inf"


def _ms(s: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``mean ± std`` of a stat dict (``± -`` for a single seed)."""
    if not s or s.get("mean") is None:
        return "inf" if s and s.get("values") else "-"
    if digits:
        return f"{s['mean']:.{digits}f} ± " + (f"{s['std']:.{digits}f}" if s.get("std") is not None else "-")
    return f"{s['mean']:.4g} ± " + (f"{s['std']:.2g}" if s.get("std") is not None else "-")


def _space(phis: Sequence[Mapping[str, Any]]) -> str:
    spaces = {p.get("space") for phi in phis for p in phi.values() if isinstance(p, dict)}
    return spaces.pop() if len(spaces) == 1 else "headline"


def _protocol_columns(results: Sequence[Mapping[str, Any]]) -> list[Protocol]:
    found = {p for r in results for _, p, _ in fewshot_items(r)}
    return sorted(found, key=lambda p: (p.within or "", p.way, p.shot))


def sweep_table(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by sweep.md and the HTML report): one row per run,
    or, for a seeded sweep, one row per grid point with mean ± std over seeds."""
    if is_seeded(results):
        return seed_table(aggregate_seeds(results))
    protos = _protocol_columns(results)
    space = _space([r.get("phi") or {} for r in results])
    acc_header, acc_key = accuracy_column(results)
    header = ["point", "epoch", acc_header] + [f"novel {p.title} %" for p in protos] + \
        [f"phi base ({space})", f"phi novel ({space})"]
    rows = []
    for r in results:
        fs = {p: e for _, p, e in fewshot_items(r)}
        name = r.get("name", "?") + (" (diverged)" if r.get("error") else "")
        phi = r.get("phi") or {}
        rows.append([name, str(r.get("epoch") if r.get("epoch") is not None else "-"), _pct(r.get(acc_key))]
                    + [f"{fs[p]['mean']:.2f} ± {fs[p]['ci95']:.2f}" if p in fs else "-" for p in protos]
                    + [_num(phi[k]["phi"]) if k in phi else "-" for k in ("base", "novel")])
    return header, rows


def seed_table(agg: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows of aggregated points: ``mean ± std`` over seeds; few-shot cells add ``[c]`` = the mean
    per-seed 95% CI over episodes."""
    labels = list(dict.fromkeys(k for a in agg for k in a["fewshot"]))
    protos = sorted((parse_protocol(k) for k in labels), key=lambda p: (p.within or "", p.way, p.shot))
    space = _space([a["phi"] for a in agg])
    acc_header, acc_key = accuracy_column(agg)
    header = ["point", "seeds", acc_header] + [f"novel {p.title} %" for p in protos] + \
        [f"phi base ({space})", f"phi novel ({space})"]
    rows = []
    for a in agg:
        seeds = ",".join(str(s) for s in a["seeds"]) or "-"
        if a["diverged"]:
            seeds += f" ({len(a['diverged'])} diverged)"
        cells = []
        for p in protos:
            f = a["fewshot"].get(p.label)
            cells.append(f"{_ms(f)} [{f['ci95']:.2f}]" if f and f["mean"] is not None else "-")
        rows.append([a["name"], seeds, _ms(a.get(acc_key))] + cells
                    + [_ms(a["phi"].get(k), 0) for k in ("base", "novel")])
    return header, rows


EFFECT_INTRO = ("Differences to the reference point (mean over seeds; SE from the seed spread, paired by seed "
                "when both points ran the same seeds; * = chosen on val):")


def summary_markdown(title: str, summary: SweepSummary) -> tuple[str, list[dict[str, Any]] | None]:
    """``sweep.md`` text and, for a seeded sweep, the aggregate (one entry per grid point)."""
    points = summary.point_dicts()
    md = f"# Sweep {title}\n\n"
    agg = None
    if is_seeded(points):
        agg = aggregate_seeds(points)
        seeds = ", ".join(str(s) for s in summary.seeds or []) or "(train.seed axis)"
        md += (f"{len(agg)} points x seeds {seeds}: "
               f"mean ± sample std over seeds; [c] = mean per-seed 95% CI over episodes.\n\n")
    header, rows = sweep_table(points)
    md += markdown_table(header, rows) + "\n"
    effect = margin_effect(agg, summary.axis) if agg is not None else []
    if effect:
        md += f"\n{EFFECT_INTRO}\n\n" + "".join(f"- {line}\n" for line in effect)
    md += "\n![accuracy vs sweep axis](sweep.png)\n"
    return md, agg


def write_summary(out: str | Path, summary: SweepSummary | None = None, *, figure: bool = True,
                  log: Callable[[str], None] | None = None) -> None:
    """Write ``sweep.md`` and (``figure``) ``sweep.png`` of a sweep folder, and add the seed
    ``aggregate`` to its ``sweep.json``; ``summary`` defaults to the folder's ``sweep.json``."""
    from ..fileio import write_text_atomic
    from .figures import plot_sweep
    out = Path(out)
    if summary is None:
        summary = SweepSummary.from_dict(json.loads((out / "sweep.json").read_text()), str(out / "sweep.json"))
    md, agg = summary_markdown(out.name, summary)
    if agg is not None:  # a copy: the caller's summary (run_sweep's, still growing) stays its own
        summary = dataclasses.replace(summary, aggregate=agg, seeds=list(summary.seeds or []))
    write_text_atomic(out / "sweep.json", json.dumps(summary.to_dict(), indent=2))
    write_text_atomic(out / "sweep.md", md)
    if figure:
        plot_sweep(summary.point_dicts(), summary.axis, out / "sweep.png")
    if log is not None:
        log(f"\n{md}")
        log(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
