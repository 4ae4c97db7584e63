"""Hyper-parameter sweeps (the paper's margin sweep): train each grid point, evaluate, tabulate, plot.

Layout of a sweep directory::

    <out>/<point-name>/        a normal training run (config.yaml, metrics.jsonl, last.pt, best.pt,
                               tensorboard/ with train.tensorboard: one TensorBoard run per point)
    <out>/<point-name>/result.json   written last: its presence marks the point as finished
    <out>/sweep.json, sweep.md, sweep.png

With ``seeds``, every grid point is trained once per seed (``train.seed``), each (point, seed) a
normal resumable run named ``<point-name>,train.seed=<s>``; tables and figures then show the mean
+/- sample std over seeds (the per-episode 95% CI of one seed is kept beside it).

Novel-class protocols are ``WAYxSHOT`` or ``WAYxSHOT@KEY`` (e.g. ``5x1``, ``20x1@alphabet``): ``@KEY``
draws every episode's classes from one group of the dataset's class metadata ``KEY`` (Lake et
al.'s within-alphabet Omniglot episodes, ``ImageDataset.sample_groups``).

Resumable: a finished point is read back, an interrupted one resumes from its ``last.pt``
(bit-exact, see ``lowshot.train``), a point trained but not evaluated is only evaluated. A point
whose stored config differs from the requested one is an error (never silently mixed results).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import Config, from_dict, load_config, parse_override, set_dotted, to_dict, validate
from ..errors import ConfigError
from ..rundir import BEFORE_FIRST_CHECKPOINT

# keys that do not change what is trained (machine / logging details)
IGNORED_KEYS = ("name", "out_dir", "train.progress", "train.device", "train.eval_batch_size", "train.tensorboard",
                "train.max_steps",
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


# ----------------------------------------------------------------------------- novel protocols

SEED_KEY = "train.seed"
_PROTOCOL_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?:@\s*([A-Za-z_][\w.-]*)\s*)?$")


@dataclass(frozen=True)
class Protocol:
    """One novel-class evaluation: ``way``-way ``shot``-shot, optionally within groups of ``within``."""
    way: int
    shot: int
    within: str | None = None

    @property
    def label(self) -> str:
        """Key in ``result.json["fewshot"]`` and text on the command line: ``5x1``, ``20x1@alphabet``."""
        return f"{self.way}x{self.shot}" + (f"@{self.within}" if self.within else "")

    @property
    def title(self) -> str:
        return f"{self.way}-way {self.shot}-shot" + (f" within {self.within}" if self.within else "")


def parse_protocol(text: str) -> Protocol:
    """``'5x1'`` / ``'20x1@alphabet'`` -> Protocol (ConfigError naming the accepted form)."""
    m = _PROTOCOL_RE.match(str(text))
    if not m or int(m.group(1)) < 2 or int(m.group(2)) < 1:
        raise ConfigError(f"bad few-shot protocol {text!r}: expected WAYxSHOT or WAYxSHOT@GROUP_KEY with way >= 2 "
                          f"and shot >= 1 (e.g. 5x1, 5x5, 20x1@alphabet)")
    return Protocol(int(m.group(1)), int(m.group(2)), m.group(3))


def fewshot_items(result: Mapping[str, Any]) -> list[tuple[str, Protocol, dict[str, Any]]]:
    """(key, protocol, {"mean", "ci95", ...}) of a point's few-shot results, in stored order. Reads
    today's ``WAYxSHOT[@KEY]`` keys and the shot-only keys (``"1"``) of sweeps written before
    protocols existed (their way is the stored protocol's ``way``)."""
    way = (result.get("protocol") or {}).get("way", 5)
    out = []
    for key, entry in (result.get("fewshot") or {}).items():
        if not isinstance(entry, dict):
            continue
        if str(key).isdigit():
            proto = Protocol(int(way), int(key))
        else:
            try:
                proto = parse_protocol(str(key))
            except ConfigError:
                continue
        out.append((str(key), proto, entry))
    return out


def protocol_of(cfg: Config, shots: Sequence[int] | None, episodes: int | None, method: str | None,
                protocols: Sequence[str] | None = None) -> dict[str, Any]:
    """The evaluation protocol of a point; ``protocols`` (``5x1``, ``20x1@alphabet``) win over
    ``shots`` (``eval.way`` x each shot), which default to ``eval.shots``."""
    e = cfg.eval
    if protocols:
        parsed = [parse_protocol(p) for p in protocols]
    else:
        parsed = [Protocol(int(e.way), int(s)) for s in (e.shots if shots is None else shots)]
    labels = list(dict.fromkeys(p.label for p in parsed))
    return {"protocols": labels, "query": e.query, "episodes": int(e.episodes if episodes is None else episodes),
            "method": method or e.method, "seed": e.seed, "options": dict(e.options)}


def check_protocol_groups(cfg: Config, protocol: Mapping[str, Any]) -> None:
    """A ``@KEY`` protocol needs a novel split whose classes carry metadata ``KEY``: checked before any
    training (loading the novel split once), so a typo never surfaces after hours of training."""
    keys = {parse_protocol(p).within for p in protocol["protocols"]} - {None}
    if not keys:
        return
    if not cfg.data.novel_split:
        raise ConfigError(f"protocol(s) {', '.join(sorted(protocol['protocols']))} need data.novel_split")
    from ..data import build_dataset
    from ..errors import DataError
    d = cfg.data
    ds = build_dataset(d.name, d.novel_split, root=d.root, image_size=d.image_size, **d.options)
    for key in sorted(keys):
        try:
            ds.sample_groups(key)
        except DataError as e:
            raise DataError(f"protocol @{key}: dataset {d.name!r} split {d.novel_split!r}: {e}") from None


# ----------------------------------------------------------------------------- one point


def evaluate_point(run_dir: Path, cfg: Config, protocol: dict[str, Any],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Base accuracy (from metrics), novel few-shot accuracy and phi of a trained point."""
    from ..inference import FrozenRun
    from ..train import _fewshot_method_kwargs
    from ..utils import read_jsonl, resolve_device
    from .analyze import split_features, split_report
    ckpt_path = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    device = resolve_device(cfg.train.device)
    run = FrozenRun.open(ckpt_path, device=device)
    model, transform, ckpt = run.model, run.transform, run.checkpoint
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
            groups: dict[str, list[Any]] = {}
            for label in protocol["protocols"]:
                p = parse_protocol(label)
                if p.within and p.within not in groups:
                    groups[p.within] = feats["dataset"].sample_groups(p.within)
                res = evaluate(feats["features"], feats["labels"], way=p.way, shot=p.shot,
                               query=protocol["query"], episodes=protocol["episodes"], method=protocol["method"],
                               seed=protocol["seed"], device=device, class_names=feats["class_names"],
                               groups=groups.get(p.within) if p.within else None, **kw)
                result["fewshot"][label] = {"mean": float(res["mean"]), "ci95": float(res["ci95"]),
                                            "way": p.way, "shot": p.shot, "within": p.within}
                log(f"  novel {p.title} ({protocol['method']}, {protocol['episodes']} "
                    f"episodes): {res['mean']:.2f} ± {res['ci95']:.2f}")
    return result


# ----------------------------------------------------------------------------- the sweep

def run_sweep(config: str | Path | Config, grid: Mapping[str, Sequence[Any]], out_dir: str | Path | None = None, *,
              shots: Sequence[int] | None = None, episodes: int | None = None, method: str | None = None,
              protocols: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train + evaluate every grid point sequentially; returns one result dict per (point, seed) run
    (grid order, seeds innermost).

    ``config``: a YAML path or a Config; ``overrides``: fixed ``key=value`` for every point;
    ``protocols`` (``5x1``, ``20x1@alphabet``) or ``shots`` (``eval.way`` x shot), ``episodes`` and
    ``method`` default to the config's ``eval`` section. ``seeds``: train every point once per
    ``train.seed`` value (the summary then aggregates mean +/- std over seeds). A point whose loss
    diverges is reported (``"error"`` key, "(diverged)" in the table) and the sweep goes on; it has
    no result.json, so the next run retries it.
    """
    from ..checkpoint import load_checkpoint, write_text_atomic
    from ..config import apply_overrides
    from ..report.figures import require_matplotlib
    from ..train import train
    require_matplotlib("lowshot sweep (sweep.png)")  # before training the grid, not after
    base = load_config(config, overrides) if not isinstance(config, Config) else apply_overrides(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path(base.out_dir) / f"{base.name}_sweep"
    points = expand_grid(grid)
    seed_list = _check_seeds(grid, seeds)
    if shots and protocols:
        raise ConfigError("give the novel protocols either as --shots (eval.way x shot) or as --protocols, not both")
    if seed_list:
        points = [{**p, SEED_KEY: s} for p in points for s in seed_list]
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
    check_protocol_groups(plan[0][2], protocol_of(plan[0][2], shots, episodes, method, protocols))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = dict(grid=grid, seeds=seed_list)
    results: list[dict[str, Any]] = []
    for i, (point, name, cfg) in enumerate(plan, 1):
        rdir = out / name
        protocol = protocol_of(cfg, shots, episodes, method, protocols)
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
            _write_summary(out, **summary, results=results, log=None, figure=False)
            continue
        result = {"name": name, "point": dict(point), "run_dir": name,
                  **evaluate_point(rdir, cfg, protocol, log), "protocol": protocol, "config": wanted}
        write_text_atomic(res_path, json.dumps(result, indent=2))
        log(f"[{i}/{len(plan)}] {name}: {summary_line(result)}")
        results.append(result)
        _write_summary(out, **summary, results=results, log=None, figure=False)  # partial table if interrupted later
    _write_summary(out, **summary, results=results, log=log)
    return results


def _check_seeds(grid: Mapping[str, Sequence[Any]], seeds: Sequence[int] | None) -> list[int]:
    if not seeds:
        return []
    if SEED_KEY in grid:
        raise ConfigError(f"give the seeds either as --seeds or as a {SEED_KEY}=... axis, not both")
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"--seeds: {s!r} is not a non-negative integer")
        if s in out:
            raise ConfigError(f"--seeds: seed {s} is given twice")
        out.append(s)
    return out

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
    for _, proto, r in fewshot_items(result):
        parts.append(f"novel {proto.title} {r['mean']:.2f} ± {r['ci95']:.2f}")
    for kind, r in result.get("phi", {}).items():
        parts.append(f"phi {kind} {_num(r.get('phi'))}")
    return ", ".join(parts)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2f}"


def _num(x: Any) -> str:
    if x is None:
        return "inf"
    return f"{float(x):.4g}" if math.isfinite(float(x)) else "inf"


# ----------------------------------------------------------------------------- seeds

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
    metrics = [("base acc", lambda a: a["base_acc"])] + \
        [(f"novel {parse_protocol(k).title}", (lambda a, k=k: a["fewshot"].get(k))) for k in ref["fewshot"]]
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
        cells = []
        for a in sorted(items, key=lambda a: a["point"][axis]):
            if a is ref:
                continue
            v = get(a)
            if not v or v["mean"] is None or v["n"] < 2:
                continue
            d = v["mean"] - b["mean"]
            star = "*" if a is chosen else ""
            if a["seeds"] == ref["seeds"] and len(v["values"]) == len(b["values"]):
                diffs = [x - y for x, y in zip(v["values"], b["values"], strict=True)]
                se = statistics.stdev(diffs) / math.sqrt(len(diffs))
                cells.append(f"{format_value(a['point'][axis])}{star}: {d:+.2f} (paired SE {se:.2f})")
            else:
                se = math.sqrt(v["std"] ** 2 / v["n"] + b["std"] ** 2 / b["n"])
                cells.append(f"{format_value(a['point'][axis])}{star}: {d:+.2f} (SE {se:.2f})")
        lines.append(f"{label}, difference to {axis}={reference:g} ({b['mean']:.2f} ± {b['std']:.2f}): "
                     + "; ".join(cells))
    return lines


# ----------------------------------------------------------------------------- tables

def _ms(s: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``mean ± std`` of a stat dict (``± -`` for a single seed)."""
    if not s or s.get("mean") is None:
        return "inf" if s and s.get("values") else "-"
    if digits:
        return f"{s['mean']:.{digits}f} ± " + (f"{s['std']:.{digits}f}" if s.get("std") is not None else "-")
    return f"{s['mean']:.4g} ± " + (f"{s['std']:.2g}" if s.get("std") is not None else "-")


def _space(results: Sequence[Mapping[str, Any]]) -> str:
    spaces = {r2.get("space") for r in results for r2 in (r.get("phi") or {}).values() if isinstance(r2, dict)}
    return spaces.pop() if len(spaces) == 1 else "headline"


def _protocol_columns(results: Sequence[Mapping[str, Any]]) -> list[Protocol]:
    found = {p for r in results for _, p, _ in fewshot_items(r)}
    return sorted(found, key=lambda p: (p.within or "", p.way, p.shot))


def sweep_table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by sweep.md and the HTML report): one row per run,
    or, for a seeded sweep, one row per grid point with mean ± std over seeds."""
    if is_seeded(results):
        return seed_table(aggregate_seeds(results))
    protos = _protocol_columns(results)
    space = _space(results)
    header = ["point", "epoch", "base acc %"] + [f"novel {p.title} %" for p in protos] + \
        [f"phi base ({space})", f"phi novel ({space})"]
    rows = []
    for r in results:
        fs = {p: e for _, p, e in fewshot_items(r)}
        name = r.get("name", "?") + (" (diverged)" if r.get("error") else "")
        rows.append([name, str(r.get("epoch", "-")), _pct(r.get("base_acc"))]
                    + [f"{fs[p]['mean']:.2f} ± {fs[p]['ci95']:.2f}" if p in fs else "-" for p in protos]
                    + [_num(r["phi"][k]["phi"]) if k in r.get("phi", {}) else "-" for k in ("base", "novel")])
    return header, rows


def seed_table(agg: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows of aggregated points: ``mean ± std`` over seeds; few-shot cells add ``[c]`` = the mean
    per-seed 95% CI over episodes."""
    labels = list(dict.fromkeys(k for a in agg for k in a["fewshot"]))
    protos = sorted((parse_protocol(k) for k in labels), key=lambda p: (p.within or "", p.way, p.shot))
    spaces = {v.get("space") for a in agg for v in a["phi"].values()}
    space = spaces.pop() if len(spaces) == 1 else "headline"
    header = ["point", "seeds", "base acc %"] + [f"novel {p.title} %" for p in protos] + \
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
        rows.append([a["name"], seeds, _ms(a["base_acc"])] + cells
                    + [_ms(a["phi"].get(k), 0) for k in ("base", "novel")])
    return header, rows


def sweep_axis(grid: Mapping[str, Sequence[Any]]) -> str | None:
    """The x axis of the sweep figure: head.margin if swept, else the first all-numeric key."""
    if "head.margin" in grid:
        return "head.margin"
    for key, values in grid.items():
        if key != SEED_KEY and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key
    return None


def _write_summary(out: Path, grid: Mapping[str, Sequence[Any]], results: list[dict[str, Any]],
                   log: Callable[[str], None] | None, figure: bool = True, seeds: Sequence[int] = ()) -> None:
    from ..checkpoint import write_text_atomic
    from ..report.figures import plot_sweep
    from ..report.html import markdown_table
    slim = [{k: v for k, v in r.items() if k != "config"} for r in results]
    axis = sweep_axis(grid)
    data: dict[str, Any] = {"grid": {k: list(v) for k, v in grid.items()}, "axis": axis, "points": slim}
    md = f"# Sweep {out.name}\n\n"
    if is_seeded(slim):
        agg = aggregate_seeds(slim)
        data.update(seeds=list(seeds), aggregate=agg)
        md += (f"{len(agg)} points x seeds {', '.join(str(s) for s in seeds) or '(train.seed axis)'}: "
               f"mean ± sample std over seeds; [c] = mean per-seed 95% CI over episodes.\n\n")
    header, rows = sweep_table(slim)
    md += markdown_table(header, rows) + "\n"
    effect = margin_effect(data["aggregate"], axis) if "aggregate" in data else []
    if effect:
        md += "\nDifferences to the reference point (mean over seeds; SE from the seed spread, paired by seed " \
              "when both points ran the same seeds; * = chosen on val):\n\n" \
              + "".join(f"- {line}\n" for line in effect)
    md += "\n![accuracy vs sweep axis](sweep.png)\n"
    write_text_atomic(out / "sweep.json", json.dumps(data, indent=2))
    write_text_atomic(out / "sweep.md", md)
    if figure:
        plot_sweep(slim, axis, out / "sweep.png")
    if log is not None:
        log(f"\n{md}")
        log(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
