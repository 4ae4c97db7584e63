"""Find and read the result files of training runs, sweeps and demo directories.

What is read (every file optional; a directory counts when it holds at least one), each through
its result dataclass (:mod:`lowshot.results`), never by guessing at keys:

- training run:  ``config.yaml``, ``metrics.jsonl`` (curves), ``eval*.json`` (``EvalResult``),
  ``decouple_*.json`` (``DecoupleResult``), ``generalized*.json`` (``GeneralizedReport``),
  ``analysis.json`` or ``analysis/analysis.json`` (``PhiAnalysis``), ``result.json`` (a sweep
  point's evaluation, ``SweepPoint``)
- sweep:         ``sweep.json`` (``SweepSummary``, + its point directories, which are training runs)
- anything else: searched recursively (3 levels) for the above, e.g. a demo directory.

A file that is not readable JSON or not a record of its kind is left out with a note naming the
file and the key (reports are built from the outputs of many runs: one bad file must not stop it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..errors import DataError
from ..results import DecoupleResult, EvalResult, PhiAnalysis, SweepPoint, SweepSummary

T = TypeVar("T")

RUN_MARKERS = ("metrics.jsonl", "result.json", "analysis.json", "last.pt", "best.pt")
MAX_DEPTH = 3


@dataclass
class Run:
    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[str, EvalResult]] = field(default_factory=list)  # (file name, record)
    decouple: list[tuple[str, str, DecoupleResult]] = field(default_factory=list)  # (method, file, record)
    generalized: list[tuple[str, Any]] = field(default_factory=list)  # (file name, GeneralizedReport)
    analysis: PhiAnalysis | None = None
    analysis_dir: Path | None = None
    result: SweepPoint | None = None


@dataclass
class Sweep:
    path: Path
    label: str
    data: SweepSummary


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


def _read_record(path: Path, parse: Callable[[Any, str], T], notes: list[str]) -> T | None:
    """``parse(json, path)``; None and a note naming the file when it is not readable or malformed."""
    data = _read_json(path, notes)
    if data is None:
        return None
    try:
        return parse(data, str(path))
    except DataError as e:
        notes.append(f"skipped {path}: {e}")
        return None


def _is_run(d: Path) -> bool:
    return any((d / m).is_file() for m in RUN_MARKERS) or any(d.glob("eval*.json")) \
        or any(d.glob("decouple_*.json")) or any(d.glob("generalized*.json"))


def _generalized(data: Any, where: str) -> Any:
    from ..fewshot.generalized import GeneralizedReport
    if not isinstance(data, dict):
        raise DataError("expected a JSON object")
    return GeneralizedReport.from_dict(data)


def _read_run(d: Path, label: str, notes: list[str]) -> Run:
    from ..fileio import read_jsonl
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
        ev = _read_record(f, EvalResult.from_dict, notes)
        if ev is not None:
            run.evals.append((f.name, ev))
    for f in sorted(d.glob("decouple_*.json")):
        dec = _read_record(f, DecoupleResult.from_dict, notes)
        if dec is not None:
            run.decouple.append((f.stem[len("decouple_"):], f.name, dec))
    for f in sorted(d.glob("generalized*.json")):
        rep = _read_record(f, _generalized, notes)
        if rep is not None:
            run.generalized.append((f.name, rep))
    for a in (d / "analysis.json", d / "analysis" / "analysis.json"):
        if a.is_file():
            run.analysis = _read_record(a, PhiAnalysis.from_dict, notes)
            run.analysis_dir = a.parent if run.analysis is not None else None
            break
    if (d / "result.json").is_file():
        run.result = _read_record(d / "result.json", SweepPoint.from_dict, notes)
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
                data = _read_record(d / "sweep.json", SweepSummary.from_dict, out.notes)
                if data is not None:
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
