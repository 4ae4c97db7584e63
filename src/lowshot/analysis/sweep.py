"""Hyper-parameter sweeps (the paper's margin sweep): train each grid point, evaluate, tabulate, plot.

Layout of a sweep directory::

    <out>/<point-name>/        a normal training run (config.yaml, metrics.jsonl, last.pt, best.pt,
                               tensorboard/ with train.tensorboard: one TensorBoard run per point)
    <out>/<point-name>/result.json   written last: its presence marks the point as finished
    <out>/sweep.json, sweep.md, sweep.png

Resumable: a finished point is read back, an interrupted one resumes from its ``last.pt``
(bit-exact, see ``lowshot.train``), a point trained but not evaluated is only evaluated. A point
whose stored config differs from the requested one is an error (never silently mixed results).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import Config, from_dict, load_config, parse_override, set_dotted, to_dict, validate
from ..errors import ConfigError
from ..rundir import BEFORE_FIRST_CHECKPOINT

# keys that do not change what is trained (machine / logging details)
IGNORED_KEYS = ("name", "out_dir", "train.progress", "train.device", "train.eval_batch_size", "train.tensorboard",
                "data.root", "data.download", "data.num_workers", "eval.")


# ----------------------------------------------------------------------------- grid parsing

def split_values(raw: str) -> list[str]:
    """Split ``a,b,[c,d]`` at top-level commas: a value in brackets/braces/quotes is one value."""
    items, depth, quote, cur = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return items


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``'head.margin=-0.1,0'`` -> ``('head.margin', [-0.1, 0])`` (values parsed like overrides)."""
    key, _ = parse_override(text)
    raw = text.split("=", 1)[1]
    values = []
    for item in split_values(raw):
        if not item.strip():
            raise ConfigError(f"sweep axis {text!r} has an empty value (check the commas)")
        values.append(parse_override(f"{key}={item.strip()}")[1])
    return key, values


def parse_sweep_args(items: Sequence[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """CLI items -> (grid axes, fixed overrides). The first item is always a swept axis (the one the
    figure plots, e.g. head.margin); later items are axes when they have several values and fixed
    overrides for every point (not part of point names) when they have one."""
    axes: dict[str, list[Any]] = {}
    fixed: list[str] = []
    seen: set[str] = set()
    for i, text in enumerate(items):
        key, values = parse_axis(text)
        if key in seen:
            raise ConfigError(f"sweep key {key!r} is given twice")
        seen.add(key)
        if i == 0 or len(values) > 1:
            axes[key] = values
        else:
            fixed.append(text)
    return axes, fixed


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product in the given key order (first key varies slowest)."""
    if not grid:
        raise ConfigError("empty sweep grid: give at least one key=v1,v2,... (e.g. head.margin=-0.1,0,0.1)")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep key {key!r} needs a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def format_value(value: Any) -> str:
    """Short, YAML-readable text of a value (used in point names and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def point_name(point: Mapping[str, Any]) -> str:
    """Directory name of a grid point, e.g. ``head.margin=-0.1`` or ``head.margin=0,optim.lr=0.1``."""
    text = ",".join(f"{k}={format_value(v)}" for k, v in point.items())
    safe = "".join(ch if ch.isalnum() or ch in "._=,+-[]{}:" else "_" for ch in text)
    return safe[:200]


def point_config(base: Config, point: Mapping[str, Any], name: str) -> Config:
    data = to_dict(base)
    for key, value in point.items():
        set_dotted(data, key, value)
    data["name"] = name
    try:
        return validate(from_dict(data))
    except ConfigError as e:
        raise ConfigError(f"sweep point {name}: {e}") from None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def config_difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """First training-relevant key whose value differs, as text (None: same run).

    The stored config is first completed with today's defaults, so a key added to lowshot after
    the run was trained does not count as a difference when the request keeps its default."""
    try:
        stored = to_dict(from_dict(stored))
    except ConfigError:
        pass  # a key that no longer exists: compare as stored (it will show up as the difference)
    a, b = _flat(stored), _flat(wanted)
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS):
            continue
        if a.get(key) != b.get(key):
            return f"{key}: stored {a.get(key)!r}, requested {b.get(key)!r}"
    return None


# ----------------------------------------------------------------------------- one point

def protocol_of(cfg: Config, shots: Sequence[int] | None, episodes: int | None, method: str | None) -> dict[str, Any]:
    e = cfg.eval
    return {"way": e.way, "shots": [int(s) for s in (e.shots if shots is None else shots)], "query": e.query,
            "episodes": int(e.episodes if episodes is None else episodes), "method": method or e.method, "seed": e.seed,
            "options": dict(e.options)}


def evaluate_point(run_dir: Path, cfg: Config, protocol: dict[str, Any],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Base accuracy (from metrics), novel few-shot accuracy and phi of a trained point."""
    from ..embed import load_for_inference
    from ..train import _fewshot_method_kwargs
    from ..utils import read_jsonl, resolve_device
    from .analyze import split_features, split_report
    ckpt_path = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    device = resolve_device(cfg.train.device)
    model, _, transform, ckpt = load_for_inference(ckpt_path, device)
    records = read_jsonl(run_dir / "metrics.jsonl")
    at_ckpt = next((r for r in records if r.get("epoch") == ckpt.get("epoch")), {})
    final = records[-1] if records else {}
    result: dict[str, Any] = {
        "checkpoint": ckpt_path.name, "epoch": ckpt.get("epoch"),
        "base_acc": at_ckpt.get("base_acc"), "final_base_acc": final.get("base_acc"),
        "val_mean": at_ckpt.get("val_mean"), "fewshot": {}, "phi": {},
    }
    kinds = ["base"] + (["novel"] if cfg.data.novel_split else [])
    for kind in kinds:
        feats = split_features(model, cfg, transform, ckpt["data"], kind, device=device,
                               batch_size=cfg.train.eval_batch_size)
        rep = split_report(feats, cfg.head.name)
        rep.pop("class_names")
        result["phi"][kind] = rep
        if kind == "novel":
            from ..fewshot import evaluate
            kw = _fewshot_method_kwargs(cfg, protocol["method"], protocol["options"])
            for shot in protocol["shots"]:
                res = evaluate(feats["features"], feats["labels"], way=protocol["way"], shot=shot,
                               query=protocol["query"], episodes=protocol["episodes"], method=protocol["method"],
                               seed=protocol["seed"], device=device, class_names=feats["class_names"], **kw)
                result["fewshot"][str(shot)] = {"mean": float(res["mean"]), "ci95": float(res["ci95"])}
                log(f"  novel {protocol['way']}-way {shot}-shot ({protocol['method']}, {protocol['episodes']} "
                    f"episodes): {res['mean']:.2f} ± {res['ci95']:.2f}")
    return result


# ----------------------------------------------------------------------------- the sweep

def run_sweep(config: str | Path | Config, grid: Mapping[str, Sequence[Any]], out_dir: str | Path | None = None, *,
              shots: Sequence[int] | None = None, episodes: int | None = None, method: str | None = None,
              overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train + evaluate every grid point sequentially; returns one result dict per point (grid order).

    ``config``: a YAML path or a Config; ``overrides``: fixed ``key=value`` for every point;
    ``shots`` / ``episodes`` / ``method`` default to the config's ``eval`` section. A point whose
    loss diverges is reported (``"error"`` key, "(diverged)" in the table) and the sweep goes on;
    it has no result.json, so the next run retries it.
    """
    from ..checkpoint import load_checkpoint, write_text_atomic
    from ..config import apply_overrides
    from ..report.figures import require_matplotlib
    from ..train import train
    require_matplotlib("lowshot sweep (sweep.png)")  # before training the grid, not after
    base = load_config(config, overrides) if not isinstance(config, Config) else apply_overrides(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path(base.out_dir) / f"{base.name}_sweep"
    points = expand_grid(grid)
    # resolve every point first: a typo in the last value must not surface after hours of training
    plan, seen = [], {}
    for point in points:
        name = point_name(point)
        cfg = point_config(base, point, name)
        key = json.dumps({k: v for k, v in _flat(to_dict(cfg)).items() if k != "name"}, sort_keys=True)
        if name in seen or key in seen.values():
            raise ConfigError(f"sweep point {name} duplicates another point (same name or same config)")
        seen[name] = key
        plan.append((point, name, cfg))
    if any(cfg.train.tensorboard for _, _, cfg in plan):
        from ..tblog import summary_writer_class
        summary_writer_class()  # a missing tensorboard package fails before the sweep folder exists
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for i, (point, name, cfg) in enumerate(plan, 1):
        rdir = out / name
        protocol = protocol_of(cfg, shots, episodes, method)
        wanted = to_dict(cfg)
        res_path = rdir / "result.json"
        stored = _read_json(res_path)
        error: str | None = None
        if stored is not None:
            _check_same(stored.get("config", {}), wanted, rdir)
            if stored.get("protocol") == protocol:
                log(f"[{i}/{len(plan)}] {name}: finished earlier, reusing {res_path}")
                results.append(stored)
                continue
            log(f"[{i}/{len(plan)}] {name}: evaluation protocol changed, re-evaluating (no retraining)")
        elif (rdir / "last.pt").is_file():
            ck = load_checkpoint(rdir / "last.pt")
            _check_same(ck.get("config", {}), wanted, rdir)
            if ck.get("epoch", 0) < ck["config"]["train"]["epochs"] or ck.get("epoch_step", 0):
                log(f"[{i}/{len(plan)}] {name}: resuming from {rdir / 'last.pt'} (epoch {ck.get('epoch')})")
                error = _train_point(train, cfg, rdir, log, resume=True)
            else:
                log(f"[{i}/{len(plan)}] {name}: trained earlier, evaluating")
        else:
            _check_restartable(rdir)
            log(f"[{i}/{len(plan)}] {name}: training into {rdir}")
            error = _train_point(train, cfg, rdir, log, overwrite=True)
        if error is not None:  # a diverged point is a result of the sweep, not a reason to stop it
            log(f"[{i}/{len(plan)}] {name}: DIVERGED ({error}); not evaluated, retried on the next run")
            results.append({"name": name, "point": dict(point), "run_dir": name, "error": error,
                            "fewshot": {}, "phi": {}})
            _write_summary(out, grid, results, log=None, figure=False)
            continue
        result = {"name": name, "point": dict(point), "run_dir": name,
                  **evaluate_point(rdir, cfg, protocol, log), "protocol": protocol, "config": wanted}
        write_text_atomic(res_path, json.dumps(result, indent=2))
        log(f"[{i}/{len(plan)}] {name}: {summary_line(result)}")
        results.append(result)
        _write_summary(out, grid, results, log=None, figure=False)  # partial table if interrupted later
    _write_summary(out, grid, results, log=log)
    return results


def _train_point(train: Callable[..., Any], cfg: Config, rdir: Path, log: Callable[[str], None],
                 **kw: Any) -> str | None:
    """Train one point; the divergence message when the loss became NaN/Inf (else None)."""
    from ..train import TrainingDiverged
    try:
        train(cfg, rdir, log=log, **kw)
    except TrainingDiverged as e:
        return str(e)
    return None


RESTARTABLE = BEFORE_FIRST_CHECKPOINT  # what a run writes before its first last.pt


def _check_restartable(rdir: Path) -> None:
    """A point folder without a checkpoint is restarted from scratch (its folder is emptied): only when
    it holds nothing but what a run writes before its first checkpoint."""
    if rdir.is_dir():
        other = sorted(p.name for p in rdir.iterdir() if p.name not in RESTARTABLE and not p.name.startswith("."))
        if other:
            raise ConfigError(f"{rdir} has no last.pt to resume but holds other files ({', '.join(other[:3])}); "
                              f"move them away or use another --out directory")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn write cannot happen (atomic), but a hand-edited file should not crash a sweep


def _check_same(stored: dict[str, Any], wanted: dict[str, Any], rdir: Path) -> None:
    diff = config_difference(stored, wanted)
    if diff is not None:
        raise ConfigError(f"{rdir} was trained with a different config ({diff}); use another --out directory "
                          f"or delete {rdir} to retrain it")


def summary_line(result: dict[str, Any]) -> str:
    parts = [f"base acc {_pct(result.get('base_acc'))}"]
    for shot, r in result.get("fewshot", {}).items():
        parts.append(f"novel {shot}-shot {r['mean']:.2f} ± {r['ci95']:.2f}")
    for kind, r in result.get("phi", {}).items():
        parts.append(f"phi {kind} {_num(r.get('phi'))}")
    return ", ".join(parts)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2f}"


def _num(x: Any) -> str:
    if x is None:
        return "inf"
    return f"{float(x):.4g}" if math.isfinite(float(x)) else "inf"


def sweep_table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by sweep.md and the HTML report)."""
    shots = sorted({int(s) for r in results for s in r.get("fewshot", {})})
    spaces = {r2.get("space") for r in results for r2 in r.get("phi", {}).values()}
    space = spaces.pop() if len(spaces) == 1 else "headline"
    header = ["point", "epoch", "base acc %"] + [f"novel {s}-shot %" for s in shots] + \
        [f"phi base ({space})", f"phi novel ({space})"]
    rows = []
    for r in results:
        fs = r.get("fewshot", {})
        name = r.get("name", "?") + (" (diverged)" if r.get("error") else "")
        rows.append([name, str(r.get("epoch", "-")), _pct(r.get("base_acc"))]
                    + [f"{fs[str(s)]['mean']:.2f} ± {fs[str(s)]['ci95']:.2f}" if str(s) in fs else "-" for s in shots]
                    + [_num(r["phi"][k]["phi"]) if k in r.get("phi", {}) else "-" for k in ("base", "novel")])
    return header, rows


def sweep_axis(grid: Mapping[str, Sequence[Any]]) -> str | None:
    """The x axis of the sweep figure: head.margin if swept, else the first all-numeric key."""
    if "head.margin" in grid:
        return "head.margin"
    for key, values in grid.items():
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key
    return None


def _write_summary(out: Path, grid: Mapping[str, Sequence[Any]], results: list[dict[str, Any]],
                   log: Callable[[str], None] | None, figure: bool = True) -> None:
    from ..checkpoint import write_text_atomic
    from ..report.figures import plot_sweep
    from ..report.html import markdown_table
    slim = [{k: v for k, v in r.items() if k != "config"} for r in results]
    write_text_atomic(out / "sweep.json", json.dumps({"grid": {k: list(v) for k, v in grid.items()},
                                                       "axis": sweep_axis(grid), "points": slim}, indent=2))
    header, rows = sweep_table(results)
    md = f"# Sweep {out.name}\n\n" + markdown_table(header, rows) + "\n\n![accuracy vs sweep axis](sweep.png)\n"
    write_text_atomic(out / "sweep.md", md)
    if figure:
        plot_sweep(slim, sweep_axis(grid), out / "sweep.png")
    if log is not None:
        log(f"\n{md}")
        log(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
