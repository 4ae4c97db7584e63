"""matplotlib figures for analysis, sweeps and reports.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly (never pyplot): no global backend
switch, no windows, safe in notebooks and on headless servers. PNGs are written without the
"Software" metadata chunk so reports stay free of any URL.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

DPI = 110


def require_matplotlib(purpose: str = "drawing figures") -> None:
    """matplotlib is a core dependency; this turns a broken/missing install into one clear error."""
    from ..utils import require
    require("matplotlib.backends.backend_agg", purpose)


def new_figure(width: float = 6.4, height: float = 4.0) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Atomic PNG write (a crash never leaves half an image next to a report)."""
    from ..fileio import atomic_write
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", metadata={"Software": None}))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


# ----------------------------------------------------------------------------- analysis

def plot_projection(xy: torch.Tensor, names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Scatter of 2-D points coloured by class name."""
    fig = new_figure(5.6, 4.6)
    ax = fig.add_subplot()
    pts = torch.as_tensor(xy).float()
    for name in dict.fromkeys(names):  # first-seen order
        idx = [i for i, n in enumerate(names) if n == name]
        ax.scatter(pts[idx, 0].numpy(), pts[idx, 1].numpy(), s=8, alpha=0.7, label=str(name))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- sweeps

def _series(results: Sequence[dict[str, Any]], x_key: str | None) -> dict[str, list[tuple[Any, dict[str, Any]]]]:
    """Group sweep points by the non-x keys; each group is a list of (x, result) sorted by x."""
    groups: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for i, r in enumerate(results):
        point = r.get("point", {})
        if x_key is not None and x_key in point:
            x = point[x_key]
            rest = ", ".join(f"{k}={v}" for k, v in point.items() if k != x_key)
            rest = rest if len(rest) <= 60 else rest[:57] + "..."
        else:
            x, rest = i, ""
        groups.setdefault(rest, []).append((x, r))
    for g in groups.values():
        g.sort(key=lambda t: t[0])
    return groups


def _mean_err(s: dict[str, Any] | None, fallback_ci: bool) -> tuple[float, float]:
    """(mean, error bar) of an aggregated stat: the std over seeds, else (one seed) the per-episode
    CI when ``fallback_ci`` (novel accuracy), else no bar."""
    if not s or not _finite(s.get("mean")):
        return float("nan"), 0.0
    if _finite(s.get("std")):
        return float(s["mean"]), float(s["std"])
    return float(s["mean"]), float(s["ci95"]) if fallback_ci and _finite(s.get("ci95")) else 0.0


def plot_sweep(results: Sequence[dict[str, Any]], x_key: str | None, path: str | Path) -> Path:
    """The paper's margin figure (Liu et al. 2020, Fig. 3): accuracy vs the swept value, one curve for
    the base classes and one per novel protocol, next to phi (base, novel) vs the swept value.

    Runs of several ``train.seed`` values are aggregated per point: markers are means over seeds and
    error bars the sample std over seeds. A point with one seed shows the per-episode 95% CI for
    novel accuracy (and no bar for base accuracy and phi)."""
    from ..results import parse_protocol
    from .seeds import accuracy_column, aggregate_seeds, is_seeded
    seeded = is_seeded(results)
    agg = aggregate_seeds(results)
    fig = new_figure(10.0, 4.0)
    ax_acc, ax_phi = fig.subplots(1, 2)
    groups = _series(agg, x_key)
    acc_header, acc_key = accuracy_column(agg)
    acc_label = "base classes" if acc_key == "base_acc" else acc_header.removesuffix(" %") + " (held-out)"
    labels = list(dict.fromkeys(k for a in agg for k in a["fewshot"]))
    protos = sorted(labels, key=lambda k: (parse_protocol(k).within or "", parse_protocol(k).way,
                                           parse_protocol(k).shot))
    markers = "osD^v<>p*h"
    for gi, (rest, items) in enumerate(groups.items()):
        suffix = f" [{rest}]" if rest else ""
        xs = [x for x, _ in items]
        mk = markers[gi % 10]
        base = [_mean_err(a.get(acc_key), False) for _, a in items]
        if any(_finite(m) for m, _ in base):
            ax_acc.errorbar(xs, [m for m, _ in base], yerr=[e for _, e in base], marker=mk, capsize=3,
                            color="C0", label=f"{acc_label}{suffix}")
        for si, label in enumerate(protos):
            vals = [_mean_err(a["fewshot"].get(label), True) for _, a in items]
            ax_acc.errorbar(xs, [m for m, _ in vals], yerr=[e for _, e in vals], marker=mk, capsize=3,
                            color=f"C{si + 1}", label=f"novel {parse_protocol(label).title}{suffix}")
        for ki, kind in enumerate(("base", "novel")):
            vals = [_mean_err(a["phi"].get(kind), False) for _, a in items]
            if any(_finite(m) for m, _ in vals):
                ax_phi.errorbar(xs, [m for m, _ in vals], yerr=[e for _, e in vals], marker=mk, capsize=3,
                                color=f"C{ki}", label=f"{kind}{suffix}")
    label = x_key or "sweep point"
    n = sorted({a["n"] for a in agg})
    ax_acc.set_xlabel(label)
    ax_acc.set_ylabel("accuracy (%)")
    if seeded:
        seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        ax_acc.set_title(f"accuracy: mean ± std over {seeds} seeds", fontsize=9)
        ax_phi.set_title(f"feature discriminability: mean ± std over {seeds} seeds", fontsize=9)
    else:
        ax_acc.set_title("accuracy (novel: mean ± 95% CI over episodes)", fontsize=9)
        ax_phi.set_title("feature discriminability", fontsize=9)
    ax_phi.set_xlabel(label)
    ax_phi.set_ylabel("phi = D_inter / D_intra")
    if x_key is None:
        names = [a.get("name", str(i)) for i, a in enumerate(agg)]
        for ax in (ax_acc, ax_phi):
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    else:
        xs = sorted({x for items in groups.values() for x, _ in items if _finite(x)})
        if 0 < len(xs) <= 12:  # tick exactly at the swept values
            for ax in (ax_acc, ax_phi):
                ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=8)
    for ax in (ax_acc, ax_phi):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- training runs

# held-out accuracy is logged as base_acc (few-shot) or <test_split>_acc (val_acc, test_acc): lowshot.train.held_out_key
CURVE_PANELS = (("train_loss", "training loss", ()), ("train_acc", "accuracy (%)", ("base_acc", "val_acc", "test_acc")),
                ("val_mean", "few-shot validation (%)", ()))


def plot_training_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: str | Path) -> Path | None:
    """Loss, train/held-out accuracy and validation accuracy (± CI band) vs epoch; one line per run."""
    require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    panels = [(key, title, extra) for key, title, extra in CURVE_PANELS
              if any(_finite(r.get(k)) for _, recs in runs for r in recs for k in (key, *extra))]
    if not panels:
        return None
    fig = new_figure(4.0 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title, extra) in zip(axes, panels, strict=True):
        for ri, (label, recs) in enumerate(runs):
            for style, k in zip(("-",) + ("--",) * len(extra), (key, *extra), strict=True):
                pts = [(r["epoch"], r[k]) for r in recs if _finite(r.get(k)) and "epoch" in r]
                if not pts:
                    continue
                name = label if k == key else f"{label} ({k})"
                if k == "train_acc":
                    name = f"{label} (train)"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="." if k == key else "x",
                        color=f"C{ri % 10}", label=name)
                if k == "val_mean":
                    band = [(r["epoch"], r[k], r.get("val_ci95")) for r in recs
                            if _finite(r.get(k)) and _finite(r.get("val_ci95"))]
                    if band:
                        ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band],
                                        [b[1] + b[2] for b in band], color=f"C{ri % 10}", alpha=0.15)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if len(runs) <= 8 or key != "train_loss":
            ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_fewshot_bars(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Horizontal bars of few-shot accuracy with 95% CI whiskers; rows have label, mean, ci95."""
    rows = [r for r in rows if _finite(r.get("mean"))]
    if not rows:
        return None
    fig = new_figure(7.0, 0.8 + 0.32 * len(rows))
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["mean"] for r in rows], xerr=[r.get("ci95") or 0.0 for r in rows], capsize=3,
            color=[f"C{int(r.get('shot') or 0) % 10}" for r in rows])
    ax.set_yticks(y, [str(r["label"]) for r in rows], fontsize=7)
    ax.set_xlabel("accuracy (%), mean ± 95% CI")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- long tail

def plot_shot_groups(items: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path | None:
    """Grouped bars: many / medium / few / overall accuracy per classifier."""
    groups = ("many", "medium", "few", "overall")
    items = [(label, d) for label, d in items if any(_finite(d.get(g)) for g in groups)]
    if not items:
        return None
    fig = new_figure(max(5.0, 1.2 + 1.1 * len(items)), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(groups)
    for gi, g in enumerate(groups):
        vals = [d.get(g) if _finite(d.get(g)) else 0.0 for _, d in items]
        ax.bar([i + (gi - 1.5) * width for i in range(len(items))], vals, width, label=g, color=f"C{gi}")
    ax.set_xticks(range(len(items)), [label for label, _ in items], fontsize=8, rotation=15)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncols=4)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_per_class_vs_count(items: Sequence[tuple[str, Sequence[float], Sequence[int]]],
                            path: str | Path) -> Path | None:
    """Per-class accuracy against the class's training-image count (log x), one colour per classifier."""
    items = [(lbl, acc, cnt) for lbl, acc, cnt in items if len(acc) and len(acc) == len(cnt)]
    if not items:
        return None
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for i, (label, acc, counts) in enumerate(items):
        pts = [(c, a) for a, c in zip(acc, counts, strict=True) if _finite(a) and _finite(c) and c > 0]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.6, color=f"C{i % 10}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("class accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_tau_curves(items: Sequence[tuple[str, Sequence[tuple[float, float]]]], path: str | Path) -> Path | None:
    """Accuracy vs tau of tau-normalisation, one line per (classifier, split)."""
    items = [(label, curve) for label, curve in items if curve]
    if not items:
        return None
    fig = new_figure(5.6, 3.6)
    ax = fig.add_subplot()
    for i, (label, curve) in enumerate(items):
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "--" if label.endswith("(test)") else "-",
                marker=".", color=f"C{i % 10}", label=label)
    ax.set_xlabel("tau")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_seen_unseen(items: Sequence[tuple[str, Any]], path: str | Path) -> Path | None:
    """Seen-unseen curves (Chao et al. 2016): mean base vs novel accuracy as the base-score bias
    sweeps, one line per (run, shot) from its uncalibrated scores, with every calibration's
    operating point marked. ``items``: (label, ``GeneralizedReport``)."""
    lines = [(label, rep, shot) for label, rep in items for shot in sorted({r.shot for r in rep.results})]
    if not lines:
        return None
    fig = new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    markers = {"none": "o", "tau_norm": "s", "scale": "^", "bias": "D"}
    for i, (label, rep, shot) in enumerate(lines[:10]):
        color = f"C{i % 10}"
        cells = [r for r in rep.results if r.shot == shot]
        ref = next((r for r in cells if r.calibration == "none"), cells[0])
        ax.plot(ref.curve["novel"], ref.curve["base"], "-", color=color,
                label=f"{label} · {rep.way}-way {shot}-shot (AUSUC {ref.ausuc.mean:.1f})")
        for r in cells:
            ax.plot([r.novel.mean], [r.base.mean], markers.get(r.calibration, "x"), color=color, ms=6,
                    mfc="none" if r.calibration == "none" else color)
    for cal, m in markers.items():
        ax.plot([], [], m, color="0.3", label=cal)
    ax.set_xlabel("novel accuracy in the joint space (%)")
    ax.set_ylabel("base accuracy in the joint space (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5)
    return save_figure(fig, path)
