"""Turn collected run data into report sections (tables + figures) and write report.html / report.md."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from . import figures
from ..results import LongTailMetrics, fewshot_items
from .collect import Collected, Run, collect
from .html import FigureRef, Para, Section, Table, render_html, render_markdown

TITLE = "lowshot report"


def _f(x: Any, digits: int = 2) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    return f"{x:.{digits}f}" if math.isfinite(x) else ("inf" if x > 0 else "-")


def _g(x: Any) -> str:
    if x is None:
        return "inf"
    return f"{x:.4g}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _pm(mean: Any, ci: Any) -> str:
    return _f(mean) + (f" ± {_f(ci)}" if isinstance(ci, (int, float)) else "")


class _Figs:
    """Names figure files uniquely inside the report directory."""

    def __init__(self, out: Path) -> None:
        self.out, self.n = out, 0

    def path(self, stem: str) -> Path:
        self.n += 1
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:60]
        return self.out / f"fig{self.n:02d}_{safe}.png"


def _cfg(run: Run, dotted: str) -> Any:
    node: Any = run.config or (run.result.config if run.result is not None else None) or {}
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


# ----------------------------------------------------------------------------- sections

HELD_OUT_KEYS = ("base_acc", "val_acc", "test_acc")  # see lowshot.train.held_out_key


def held_out_acc(record: dict[str, Any]) -> float | None:
    """The per-epoch accuracy on data.test_split, whatever split it was logged under."""
    for key in HELD_OUT_KEYS + tuple(k for k in record if k.endswith("_acc") and k not in HELD_OUT_KEYS
                                     and k != "train_acc"):
        if isinstance(record.get(key), (int, float)):
            return record[key]
    return None


def overview_section(c: Collected) -> Section:
    s = Section("Runs")
    rows = []
    for r in c.runs:
        m = r.metrics
        best = max((x for x in m if isinstance(x.get("val_mean"), (int, float))), key=lambda x: x["val_mean"],
                   default=None)
        rows.append([r.label, str(_cfg(r, "data.name") or "-"), str(_cfg(r, "model.backbone") or "-"),
                     str(_cfg(r, "head.name") or "-"), _g(_cfg(r, "head.margin")),
                     f"{m[-1].get('epoch', '-')}/{_cfg(r, 'train.epochs') or '-'}" if m else "-",
                     _f(held_out_acc(m[-1])) if m else "-",
                     _pm(best["val_mean"], best.get("val_ci95")) + f" (epoch {best.get('epoch')})" if best else "-"])
    if rows:
        s.blocks.append(Table(["run", "dataset", "backbone", "head", "margin", "epochs", "final held-out acc %",
                               "best val % (few-shot)"], rows))
    else:
        s.blocks.append(Para("No training runs found (only sweep summaries).", note=True))
    if c.sweeps:
        s.blocks.append(Para("Sweeps: " + ", ".join(sw.label for sw in c.sweeps)))
    return s


def curves_section(c: Collected, figs: _Figs) -> Section:
    s = Section("Training curves")
    groups: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for r in c.runs:
        if r.metrics:
            parent, _, leaf = r.label.rpartition("/")
            groups.setdefault(parent or r.label, []).append((leaf or r.label, r.metrics))
    for name, runs in groups.items():
        for i in range(0, len(runs), 10):  # at most 10 lines per figure stay readable
            p = figures.plot_training_curves(runs[i:i + 10], figs.path(f"curves_{name}"))
            if p is not None:
                s.blocks.append(FigureRef(p, f"{name}: loss, train / held-out base accuracy, few-shot validation "
                                             f"(band: 95% CI) per epoch, from metrics.jsonl"))
    if not s.blocks:
        s.blocks.append(Para("No data: no metrics.jsonl found in the given directories.", note=True))
    return s


def _fewshot_rows(r: Run) -> list[tuple[str, dict[str, Any]]]:
    """(file, {method, way, shot, episodes, mean, ci95}) of every few-shot number of a run."""
    out = [(fname, {"method": a.method, "way": a.way, "shot": a.shot, "episodes": a.episodes, "mean": a.mean,
                    "ci95": a.ci95}) for fname, ev in r.evals for a in ev.results]
    if r.result is not None and r.result.fewshot:
        proto = r.result.protocol or {}
        out += [("result.json", {"mean": float(v["mean"]), "ci95": float(v["ci95"]), "shot": p.shot,
                                 "way": p.way if not p.within else f"{p.way} (within {p.within})",
                                 "method": proto.get("method"), "episodes": proto.get("episodes")})
                for _, p, v in fewshot_items(r.result.to_dict())]
    return out


def fewshot_section(c: Collected, figs: _Figs) -> Section:
    s = Section("Few-shot accuracy")
    rows, bars = [], []
    for r in c.runs:
        for fname, rec in _fewshot_rows(r):
            rows.append([r.label, fname, str(rec.get("method") or "-"), str(rec.get("way", "-")),
                         str(rec.get("shot", "-")), str(rec.get("episodes") or "-"), _pm(rec["mean"], rec["ci95"])])
            bars.append({"label": f"{r.label} · {rec.get('way', '?')}-way {rec.get('shot', '?')}-shot"
                                  f" ({rec.get('method') or '?'})", "mean": rec["mean"], "ci95": rec["ci95"],
                         "shot": rec.get("shot")})
    if not rows:
        s.blocks.append(Para("No data: no eval*.json or sweep result.json with few-shot accuracies found.", note=True))
        return s
    s.blocks.append(Table(["run", "file", "method", "way", "shot", "episodes", "accuracy % (95% CI)"], rows))
    if len(bars) <= 60:
        p = figures.plot_fewshot_bars(bars, figs.path("fewshot"))
        if p is not None:
            s.blocks.append(FigureRef(p, "few-shot accuracy on novel classes, mean ± 95% confidence interval"))
    return s


def sweeps_section(c: Collected, figs: _Figs) -> Section:
    from .seeds import aggregate_seeds, is_seeded, margin_effect
    from .sweep import sweep_table
    s = Section("Margin sweeps")
    for sw in c.sweeps:
        points = sw.data.point_dicts()
        if not points:
            s.blocks.append(Para(f"{sw.label}: sweep.json lists no finished points yet.", note=True))
            continue
        header, rows = sweep_table(points)
        seeded = is_seeded(points)
        extra = "; mean ± sample std over seeds, [c] = mean per-seed 95% CI over episodes" if seeded else ""
        s.blocks.append(Table(header, rows, caption=f"{sw.label} (grid: {sw.data.grid}{extra})"))
        effect = margin_effect(aggregate_seeds(points), sw.data.axis) if seeded else []
        if effect:
            s.blocks.append(Para("Differences to the reference point (mean over seeds; SE from the seed spread, "
                                 "paired by seed; * = chosen on validation): " + " | ".join(effect)))
        p = figures.plot_sweep(points, sw.data.axis, figs.path(f"sweep_{sw.label}"))
        bars = "error bars: std over seeds" if seeded else "error bars: 95% CI over episodes (novel)"
        s.blocks.append(FigureRef(p, f"{sw.label}: base-class and novel-class accuracy and discriminability phi "
                                     f"against {sw.data.axis or 'the sweep point'} ({bars})"))
    if not s.blocks:
        s.blocks.append(Para("No data: no sweep.json found (run `lowshot sweep`).", note=True))
    return s


def phi_section(c: Collected, figs: _Figs) -> Section:
    s = Section("Feature discriminability (phi)")
    s.blocks.append(Para("phi = D_inter / D_intra (Liu et al., ECCV 2020): mean squared distance between class "
                         "centres over mean squared distance of samples to their class centre; higher = more "
                         "separable. 'raw' uses the backbone features, 'l2' L2-normalised features."))
    rows = []
    for r in c.runs:
        sources = []
        if r.analysis is not None:
            sources.append(("analysis.json", r.analysis.splits))
        if r.result is not None and r.result.phi:
            sources.append(("result.json", r.result.phi))
        for fname, splits in sources:
            for kind, d in splits.items():
                sp = d.stats()
                rows.append([r.label, fname, kind, str(d.split or "-"), str(sp.get("num_classes", "-")),
                             str(sp.get("num_samples", "-")), f"{_g(d.phi)} ({d.space})",
                             _g((d.raw or {}).get("phi")), _g((d.l2 or {}).get("phi")),
                             _g(sp.get("inter")), _g(sp.get("intra"))])
        if r.analysis and r.analysis_dir is not None:
            for kind, name in r.analysis.projections.items():
                src = r.analysis_dir / str(name)
                if src.is_file() and src.suffix == ".png":
                    dst = figs.path(f"projection_{r.label}_{kind}")
                    shutil.copyfile(src, dst)
                    s.blocks.append(FigureRef(dst, f"{r.label}: 2-D projection of {kind} features"))
    if rows:
        s.blocks.insert(1, Table(["run", "file", "split", "dataset split", "classes", "samples", "phi (space)",
                                  "phi raw", "phi l2", "D_inter", "D_intra"], rows))
    else:
        s.blocks.append(Para("No data: no analysis.json (lowshot analyze) or sweep result.json found.", note=True))
    return s


def _lt_summary(m: LongTailMetrics, tau: float | None) -> dict[str, Any]:
    """The numbers of one classifier's row (``all`` shown as overall) and its per-class points."""
    out: dict[str, Any] = {"overall": m.all, "class_mean": m.class_mean, "many": m.many, "medium": m.medium,
                           "few": m.few, "tau": tau}
    if m.per_class:
        out.update(per_class=[row.get("accuracy") for row in m.per_class],
                   train_counts=[row.get("train_count") for row in m.per_class])
    return out


def longtail_section(c: Collected, figs: _Figs) -> Section:
    s = Section("Long-tail (decoupled classifiers)")
    rows, groups, scatter, curves = [], [], [], []
    for r in c.runs:
        joint_done = False
        for method, _file, dec in r.decouple:
            summaries = [(method, _lt_summary(dec.metrics, dec.tau))]
            if dec.joint is not None and not joint_done:  # the stage-1 classifier, once per run
                summaries.insert(0, (f"joint ({dec.joint_head or 'stage 1'})", _lt_summary(dec.joint, None)))
                joint_done = True
            for name, curve in dec.tau_curves():
                curves.append((f"{r.label} · {method} ({name})", curve))
            for name, summ in summaries:
                label = f"{r.label} · {name}"
                rows.append([r.label, name, _f(summ["overall"]), _f(summ["class_mean"]), _f(summ["many"]),
                             _f(summ["medium"]), _f(summ["few"]), _g(summ["tau"]) if summ["tau"] is not None else "-"])
                groups.append((label, summ))
                if "per_class" in summ:
                    scatter.append((label, summ["per_class"], summ["train_counts"]))
    if not rows and not curves:
        s.blocks.append(Para("No data: no decouple_*.json found (run `lowshot decouple`).", note=True))
        return s
    if rows:
        s.blocks.append(Table(["run", "method", "overall %", "class mean %", "many %", "medium %", "few %", "tau"],
                              rows))
        p = figures.plot_shot_groups(groups, figs.path("longtail_groups"))
        if p is not None:
            s.blocks.append(FigureRef(p, "accuracy on many- / medium- / few-shot classes and overall"))
    p = figures.plot_per_class_vs_count(scatter, figs.path("longtail_per_class"))
    if p is not None:
        s.blocks.append(FigureRef(p, "per-class accuracy against the number of training images of the class"))
    elif rows:
        s.blocks.append(Para("Per-class accuracy vs training count: no per_class / train_counts in the "
                             "decouple results.", note=True))
    p = figures.plot_tau_curves(curves, figs.path("tau"))
    if p is not None:
        s.blocks.append(FigureRef(p, "tau-normalisation: accuracy against tau on the split that selects tau "
                                     "(val) and, for diagnosis only, on the test split"))
    elif rows:
        s.blocks.append(Para("tau curve: no tau search curve stored in the decouple results.", note=True))
    return s


def generalized_section(c: Collected, figs: _Figs) -> Section:
    from ..fewshot.generalized import METRICS
    s = Section("Generalized few-shot (base + novel classes together)")
    items, rows = [], []
    for r in c.runs:
        for fname, rep in r.generalized:
            items.append((r.label, rep))
            for cell in rep.results:
                chosen = ", ".join(f"{k}={v:.4g}" for k, v in cell.chosen.items()) or "-"
                rows.append([r.label, fname, rep.method, f"{rep.way}+{rep.num_base_classes}", str(cell.shot),
                             cell.calibration] + [_pm(getattr(cell, k).mean, getattr(cell, k).ci95)
                                                  for k in METRICS] + [chosen])
    if not rows:
        s.blocks.append(Para("No data: no generalized*.json found (run `lowshot eval --generalized`).", note=True))
        return s
    s.blocks.append(Para("Each episode adds `way` novel classes to all base classes; base and novel queries are "
                         "scored in the joint label space. base / novel: accuracy of the base / novel queries; "
                         "delta: mean drop from the separate (base-only, novel-only) setting; AUSUC: area under "
                         "the seen-unseen curve in % of the unit square. Calibration parameters are chosen on "
                         "validation episodes. All mean ± 95% CI over episodes."))
    s.blocks.append(Table(["run", "file", "novel weights", "novel+base classes", "shot", "calibration", "base %",
                           "novel %", "joint %", "hmean %", "delta", "AUSUC", "base only %", "novel only %",
                           "chosen on val"], rows))
    p = figures.plot_seen_unseen(items, figs.path("seen_unseen"))
    if p is not None:
        s.blocks.append(FigureRef(p, "seen-unseen curve: base vs novel accuracy as a bias subtracted from the "
                                     "base scores sweeps (uncalibrated scores); markers: operating point of each "
                                     "calibration (hollow circle: none)"))
    return s


# ----------------------------------------------------------------------------- entry point

def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and the figure PNGs into ``out_dir``."""
    from ..fileio import write_text_atomic
    from ..errors import DataError
    if not run_dirs:
        raise DataError("lowshot report needs at least one RUN_DIR")
    figures.require_matplotlib("lowshot report")
    c = collect(list(run_dirs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("fig*_*.png"):  # figures of an earlier report into the same folder
        if re.fullmatch(r"fig\d+_[\w-]*\.png", old.name):
            old.unlink()
    figs = _Figs(out)
    sections = [overview_section(c), curves_section(c, figs), fewshot_section(c, figs), sweeps_section(c, figs),
                phi_section(c, figs), longtail_section(c, figs), generalized_section(c, figs)]
    intro = ["Inputs: " + ", ".join(str(p) for p in c.inputs) + f" ({len(c.runs)} runs, {len(c.sweeps)} sweeps)."]
    if c.notes:
        sections.append(Section("Notes", [Para(n, note=True) for n in c.notes]))
    write_text_atomic(out / "report.md", render_markdown(TITLE, intro, sections))
    return write_text_atomic(out / "report.html", render_html(TITLE, intro, sections))
