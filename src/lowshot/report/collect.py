"""Find and read the result files of training runs, sweeps and demo directories.

What is read (every file optional; a directory counts when it holds at least one):

- training run:  ``config.yaml``, ``metrics.jsonl`` (curves), ``eval*.json`` (few-shot results),
  ``decouple_*.json`` (long-tail results), ``generalized*.json`` (generalized few-shot, read strictly
  by ``GeneralizedReport.from_dict``), ``analysis.json`` or ``analysis/analysis.json`` (phi,
  projections), ``result.json`` (a sweep point's evaluation)
- sweep:         ``sweep.json`` (+ its point directories, which are training runs)
- anything else: searched recursively (3 levels) for the above, e.g. a demo directory.

Readers are tolerant: JSON of an unexpected shape contributes what can be recognised and a
note, never a crash, because reports are built from the outputs of several tools and versions.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

RUN_MARKERS = ("metrics.jsonl", "result.json", "analysis.json", "last.pt", "best.pt")
MAX_DEPTH = 3


@dataclass
class Run:
    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[str, Any]] = field(default_factory=list)  # (file name, parsed JSON)
    decouple: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (method, file, JSON)
    generalized: list[tuple[str, Any]] = field(default_factory=list)  # (file name, GeneralizedReport)
    analysis: dict[str, Any] | None = None
    analysis_dir: Path | None = None
    result: dict[str, Any] | None = None


@dataclass
class Sweep:
    path: Path
    label: str
    data: dict[str, Any]


@dataclass
class Collected:
    inputs: list[Path] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"skipped {path}: not readable JSON ({str(e).splitlines()[0][:120]})")
        return None


def _is_run(d: Path) -> bool:
    return any((d / m).is_file() for m in RUN_MARKERS) or any(d.glob("eval*.json")) \
        or any(d.glob("decouple_*.json")) or any(d.glob("generalized*.json"))


def _read_run(d: Path, label: str, notes: list[str]) -> Run:
    from ..utils import read_jsonl
    run = Run(path=d, label=label)
    if (d / "config.yaml").is_file():
        import yaml
        try:
            run.config = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            notes.append(f"skipped {d / 'config.yaml'}: not valid YAML")
    if (d / "metrics.jsonl").is_file():
        try:
            run.metrics = read_jsonl(d / "metrics.jsonl")
        except json.JSONDecodeError:
            notes.append(f"skipped {d / 'metrics.jsonl'}: corrupt line")
    for f in sorted(d.glob("eval*.json")):
        data = _read_json(f, notes)
        if data is not None:
            run.evals.append((f.name, data))
    for f in sorted(d.glob("decouple_*.json")):
        data = _read_json(f, notes)
        if isinstance(data, dict):
            run.decouple.append((f.stem[len("decouple_"):], f.name, data))
        elif data is not None:
            notes.append(f"skipped {f}: expected a JSON object")
    for f in sorted(d.glob("generalized*.json")):
        from ..fewshot.generalized import GeneralizedReport
        data = _read_json(f, notes)
        if data is None:
            continue
        try:
            run.generalized.append((f.name, GeneralizedReport.from_dict(data)))
        except DataError as e:
            notes.append(f"skipped {f}: {e}")
    for a in (d / "analysis.json", d / "analysis" / "analysis.json"):
        if a.is_file():
            data = _read_json(a, notes)
            if isinstance(data, dict):
                run.analysis, run.analysis_dir = data, a.parent
            break
    if (d / "result.json").is_file():
        data = _read_json(d / "result.json", notes)
        run.result = data if isinstance(data, dict) else None
    return run


def collect(run_dirs: list[str | Path]) -> Collected:
    """Walk the given directories; DataError when one does not exist or holds nothing readable."""
    out = Collected()
    for arg in run_dirs:
        root = Path(arg)
        if not root.is_dir():
            raise DataError(f"report input {root} is not a directory")
        before = (len(out.runs), len(out.sweeps))
        out.inputs.append(root)
        for d, _depth in _walk(root):
            label = root.resolve().name if d == root else f"{root.resolve().name}/{d.relative_to(root).as_posix()}"
            if (d / "sweep.json").is_file():
                data = _read_json(d / "sweep.json", out.notes)
                if isinstance(data, dict):
                    out.sweeps.append(Sweep(path=d, label=label, data=data))
            elif _is_run(d):
                out.runs.append(_read_run(d, label, out.notes))
        if (len(out.runs), len(out.sweeps)) == before:
            raise DataError(f"report input {root}: no lowshot results found (looked for metrics.jsonl, result.json, "
                            f"sweep.json, eval*.json, decouple_*.json, generalized*.json, analysis.json up to {MAX_DEPTH} levels deep)")
    return out


def _walk(root: Path) -> Iterator[tuple[Path, int]]:
    """Depth-first; does not descend into training runs (their only sub-folder of interest is analysis/)."""
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        yield d, depth
        if _is_run(d) and not (d / "sweep.json").is_file():
            continue
        if depth < MAX_DEPTH:
            kids = sorted((k for k in d.iterdir() if k.is_dir() and not k.name.startswith(".")
                           and k.name != "analysis"), reverse=True)
            stack.extend((k, depth + 1) for k in kids)


# ----------------------------------------------------------------------------- tolerant JSON readers

_SHOT_RE = re.compile(r"(\d+)[-_ ]?shots?$", re.I)
_CONTEXT = ("shot", "way", "method", "episodes", "query", "split", "dataset", "head", "checkpoint")


def accuracy_records(obj: Any, context: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every dict with a numeric ``mean`` (optionally ``ci95``), with shot/way/method taken from the
    dict itself, its parents, or a parent key like ``"5"`` / ``"5-shot"``."""
    ctx = dict(context or {})
    out: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        for k in _CONTEXT:
            if k in obj and isinstance(obj[k], (str, int, float)) and not isinstance(obj[k], bool):
                ctx[k] = obj[k]
        mean = obj.get("mean")
        if _number(mean):
            rec = {**ctx, "mean": float(mean), "ci95": float(obj["ci95"]) if _number(obj.get("ci95")) else None}
            out.append(rec)
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and k != "accuracies":
                sub = dict(ctx)
                m = _SHOT_RE.match(str(k))
                if m:
                    sub["shot"] = int(m.group(1))
                elif str(k).isdigit() and "shot" not in obj:
                    sub["shot"] = int(k)
                out += accuracy_records(v, sub)
    elif isinstance(obj, list):
        for v in obj:
            out += accuracy_records(v, ctx)
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


LT_KEYS = ("overall", "all", "class_mean", "many", "medium", "few")


def longtail_summary(data: dict[str, Any], key: str = "metrics") -> dict[str, Any] | None:
    """Long-tail accuracies of a decouple result: ``data[key]`` when present (``lowshot decouple``
    writes ``metrics`` for the new classifier and ``joint`` for the stage-1 one), else the first
    (breadth-first) dict with ``overall`` / ``all`` / ``class_mean``. ``all`` is read as ``overall``;
    ``per_class`` may be numbers (with ``train_counts``) or rows with ``accuracy`` / ``train_count``."""
    if isinstance(data.get(key), dict):
        node: Any = data[key]
    elif key != "metrics":
        return None
    else:
        node = _first_with(data, ("overall", "all", "class_mean"))
    if node is None:
        return None
    found: dict[str, Any] = {k: float(node[k]) for k in LT_KEYS if _number(node.get(k))}
    if "overall" not in found and "all" in found:
        found["overall"] = found["all"]
    found.pop("all", None)
    rows = node.get("per_class")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        found["per_class"] = [r.get("accuracy") for r in rows]
        found["train_counts"] = [r.get("train_count") for r in rows]
    else:
        counts = node.get("train_counts", data.get("train_counts"))
        if isinstance(rows, list) and isinstance(counts, list):
            found["per_class"], found["train_counts"] = rows, counts
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    sources = (node, info, data) if key == "metrics" else (node,)  # tau / method describe the new classifier
    for k in ("tau", "method"):
        v = next((d[k] for d in sources if k in d), None)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            found[k] = v
    return found


def _first_with(data: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    queue: list[Any] = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if any(_number(node.get(k)) for k in keys):
                return node
            queue.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            queue.extend(v for v in node if isinstance(v, (dict, list)))
    return None


def tau_curves(data: Any) -> list[tuple[str, list[tuple[float, float]]]]:
    """``[("val", points), ("test", points)]`` as present: the selection curve (``tau_curve`` /
    ``curve`` / ``tau_search``) and ``lowshot decouple``'s diagnostic ``test_curve``."""
    out = []
    val = tau_curve(data)
    if val:
        out.append(("val", val))
    test = tau_curve(data, ("test_curve",))
    if test:
        out.append(("test", test))
    return out


def tau_curve(data: Any, keys: tuple[str, ...] = ("tau_curve", "curve", "tau_search")) -> list[tuple[float, float]]:
    """A tau curve stored as ``[[tau, acc], ...]``, ``[{"tau", "accuracy"}, ...]`` or ``{tau: acc}``
    under one of ``keys`` (anywhere in the JSON)."""
    if isinstance(data, dict):
        for k in keys:
            if k in data:
                pts = _pairs(data[k])
                if pts:
                    return pts
        for v in data.values():
            pts = tau_curve(v, keys)
            if pts:
                return pts
    return []


def _pairs(v: Any) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    if isinstance(v, dict):
        for k, a in v.items():
            try:
                pts.append((float(k), float(a)))
            except (TypeError, ValueError):
                return []
    elif isinstance(v, list):
        for item in v:
            if isinstance(item, (list, tuple)) and len(item) == 2 and all(_number(x) for x in item):
                pts.append((float(item[0]), float(item[1])))
            elif isinstance(item, dict) and _number(item.get("tau")):
                acc = next((item[k] for k in ("accuracy", "acc", "score") if _number(item.get(k))), None)
                if acc is None:
                    return []
                pts.append((float(item["tau"]), float(acc)))
            else:
                return []
    return sorted(pts)
