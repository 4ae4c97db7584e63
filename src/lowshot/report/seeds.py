"""Seed aggregation of sweep points: mean and sample std over ``train.seed`` runs, and the
margin effect (difference to the reference margin with its standard error).

Works on the point dicts of ``sweep.json`` / ``result.json`` (``lowshot.results.SweepPoint.to_dict``).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from ..results import SEED_KEY, Protocol, fewshot_items, format_value, parse_protocol, point_name

def stat(values: Sequence[Any]) -> dict[str, Any]:
    """Mean and SAMPLE standard deviation (n - 1) of per-seed values; ``std`` is None with one value.
    A None / non-finite value (e.g. phi = inf) makes the mean None: an average with inf is not a number."""
    vals = list(values)
    finite = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(float(v))]
    if not vals or len(finite) < len(vals):
        return {"mean": None, "std": None, "n": len(vals), "values": vals}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else None,
            "n": len(finite), "values": finite}


def is_seeded(results: Sequence[Mapping[str, Any]]) -> bool:
    return any(SEED_KEY in (r.get("point") or {}) for r in results)


def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per grid point (first-seen order) over its ``train.seed`` runs: ``base_acc``,
    ``val_mean``, every few-shot protocol and phi (base, novel) as ``stat`` dicts (mean, sample std,
    n, values). Few-shot entries also keep ``ci95`` = the mean over seeds of the per-episode 95% CI
    (the within-run uncertainty, beside the across-seed spread). Diverged runs are listed in
    ``diverged`` and left out of the statistics. Results without a seed are their own point (n = 1)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    points: dict[str, dict[str, Any]] = {}
    for r in results:
        point = {k: v for k, v in (r.get("point") or {}).items() if k != SEED_KEY}
        name = point_name(point) if point else str(r.get("name", "?"))
        groups.setdefault(name, []).append(r)
        points.setdefault(name, point)
    out = []
    for name, runs in groups.items():
        ok = [r for r in runs if not r.get("error")]
        entry: dict[str, Any] = {
            "name": name, "point": points[name],
            "seeds": [(r.get("point") or {}).get(SEED_KEY) for r in ok],
            "diverged": [(r.get("point") or {}).get(SEED_KEY) for r in runs if r.get("error")],
            "n": len(ok), "base_acc": stat([r.get("base_acc") for r in ok]),
            "held_out_acc": stat([r.get("held_out_acc") for r in ok]),
            "held_out_split": next((r["held_out_split"] for r in ok if r.get("held_out_split")), None),
            "val_mean": stat([r.get("val_mean") for r in ok]), "fewshot": {}, "phi": {},
        }
        keys: dict[str, Protocol] = {}
        for r in ok:
            for key, proto, _ in fewshot_items(r):
                keys.setdefault(proto.label, proto)
        for label, proto in keys.items():
            cells = [next((e for _, p, e in fewshot_items(r) if p == proto), None) for r in ok]
            if any(c is None for c in cells):
                continue  # a protocol not evaluated on every seed is not averaged
            entry["fewshot"][label] = {**stat([c["mean"] for c in cells]),
                                       "ci95": statistics.fmean(float(c["ci95"]) for c in cells),
                                       "way": proto.way, "shot": proto.shot, "within": proto.within}
        for kind in ("base", "novel"):
            cells = [(r.get("phi") or {}).get(kind) for r in ok]
            if cells and all(isinstance(c, dict) for c in cells):
                entry["phi"][kind] = {**stat([c.get("phi") for c in cells]), "space": cells[0].get("space")}
        out.append(entry)
    return out


def margin_effect(agg: Sequence[Mapping[str, Any]], axis: str | None, reference: float = 0.0) -> list[str]:
    """Plain-text lines comparing every axis value with the reference value (margin 0), and naming the
    point chosen on validation (highest mean ``val_mean`` over seeds, marked ``*``): difference of
    means with its standard error from the seed spread. When both points ran the same seeds, the
    comparison is PAIRED (same seed = same initialisation and data order): SE = std of the per-seed
    differences / sqrt(n), which removes the seed-to-seed offset shared by all margins; otherwise
    SE = sqrt(s_a^2/n_a + s_b^2/n_b). Empty when there is no reference point or fewer than two seeds."""
    if axis is None:
        return []
    items = [a for a in agg if len(a["point"]) == 1 and axis in a["point"]
             and isinstance(a["point"][axis], (int, float))]
    ref = next((a for a in items if float(a["point"][axis]) == reference), None)
    if ref is None or ref["n"] < 2:
        return []
    metrics = [("base acc", lambda a: a["base_acc"])]
    if ref["base_acc"]["mean"] is None and (ref.get("held_out_acc") or {}).get("mean") is not None:
        metrics.append((f"{ref.get('held_out_split') or 'held-out'} acc", lambda a: a.get("held_out_acc")))
    metrics += [(f"novel {parse_protocol(k).title}", (lambda a, k=k: a["fewshot"].get(k))) for k in ref["fewshot"]]
    lines = []
    with_val = [a for a in items if a["val_mean"]["mean"] is not None]
    chosen = max(with_val, key=lambda a: a["val_mean"]["mean"]) if with_val else None
    if chosen is not None:
        at_ref = f"{ref['val_mean']['mean']:.2f}" if ref["val_mean"]["mean"] is not None else "-"
        lines.append(f"chosen on validation (highest mean val accuracy over seeds): "
                     f"{axis}={format_value(chosen['point'][axis])} (val {chosen['val_mean']['mean']:.2f} vs "
                     f"{at_ref} at {axis}={reference:g})")
    for label, get in metrics:
        b = get(ref)
        if not b or b["mean"] is None:
            continue
        cells = [f"{format_value(a['point'][axis])}{'*' if a is chosen else ''}: {_difference(a, ref, get(a), b)}"
                 for a in sorted(items, key=lambda a: a["point"][axis])
                 if a is not ref and get(a) and get(a)["mean"] is not None and get(a)["n"] >= 2]
        lines.append(f"{label}, difference to {axis}={reference:g} ({b['mean']:.2f} ± {b['std']:.2f}): "
                     + "; ".join(cells))
    return lines


def _difference(a: Mapping[str, Any], ref: Mapping[str, Any], v: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """``+d (paired SE s)`` when both points ran the same seeds, else ``+d (SE s)`` (Welch)."""
    d = v["mean"] - b["mean"]
    if a["seeds"] == ref["seeds"] and len(v["values"]) == len(b["values"]):
        diffs = [x - y for x, y in zip(v["values"], b["values"], strict=True)]
        return f"{d:+.2f} (paired SE {statistics.stdev(diffs) / math.sqrt(len(diffs)):.2f})"
    return f"{d:+.2f} (SE {math.sqrt(v['std'] ** 2 / v['n'] + b['std'] ** 2 / b['n']):.2f})"


def accuracy_column(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(header, key) of the held-out accuracy column: ``base_acc`` for few-shot configs (and sweeps
    written before ``held_out_acc`` existed); for configs whose test split is not a base split (the
    long-tail configs: no base accuracy at all) the accuracy on that split, named after it."""
    def has(r: Mapping[str, Any], key: str) -> bool:
        v = r.get(key)
        return v is not None and (not isinstance(v, dict) or v.get("mean") is not None)
    if any(has(r, "base_acc") for r in rows) or not any(has(r, "held_out_acc") for r in rows):
        return "base acc %", "base_acc"
    splits = {r.get("held_out_split") for r in rows if has(r, "held_out_acc")}
    return f"{splits.pop() if len(splits) == 1 else 'held-out'} acc %", "held_out_acc"
