"""Hyper-parameter sweeps (the paper's margin sweep): train each grid point and evaluate it.

Layout of a sweep directory::

    <out>/<point-name>/        a normal training run (config.yaml, metrics.jsonl, last.pt, best.pt,
                               tensorboard/ with train.tensorboard: one TensorBoard run per point)
    <out>/<point-name>/result.json   written last: its presence marks the point as finished
    <out>/sweep.json                 every finished point (``lowshot.results.SweepSummary``)
    <out>/sweep.md, sweep.png        the table and figure, drawn by ``lowshot.report.sweep.write_summary``
                                     (``lowshot sweep`` / ``lowshot.pipelines.sweep_with_summary``)

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

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import Config, load_config, to_dict
from ..errors import ConfigError
from ..inference import FrozenRun
from ..results import SEED_KEY, PhiSplit, Protocol, SweepPoint, SweepSummary, fewshot_items, parse_protocol, point_name
from .grid import _flat, config_difference, expand_grid, point_config

# ----------------------------------------------------------------------------- novel protocols

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


def _novel_fewshot(run: FrozenRun, protocol: dict[str, Any], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every protocol of ``protocol["protocols"]`` on the novel split (the same episodes per seed),
    through the one checkpoint-level meta-test, ``fewshot.protocol.evaluate_run``."""
    from ..fewshot.protocol import evaluate_run
    out = {}
    for label in protocol["protocols"]:
        p = parse_protocol(label)
        res, = evaluate_run(run, run.config.data.novel_split, way=p.way, shots=[p.shot], query=protocol["query"],
                            episodes=protocol["episodes"], method=protocol["method"], seed=protocol["seed"],
                            options=protocol["options"], within=p.within)
        out[label] = {"mean": float(res["mean"]), "ci95": float(res["ci95"]), "way": p.way, "shot": p.shot,
                      "within": p.within}
        log(f"  novel {p.title} ({protocol['method']}, {protocol['episodes']} "
            f"episodes): {res['mean']:.2f} ± {res['ci95']:.2f}")
    return out


def evaluate_point(run_dir: Path, cfg: Config, protocol: dict[str, Any], name: str, point: dict[str, Any],
                   log: Callable[[str], None] = print) -> SweepPoint:
    """Base accuracy (from metrics), novel few-shot accuracy and phi of a trained point.

    ``held_out_acc`` is the logged accuracy on ``data.test_split`` whatever its name (``base_acc``
    for few-shot configs, ``val_acc`` / ``test_acc`` for long-tail ones, ``lowshot.train.held_out_key``)."""
    from ..train import held_out_key
    from ..utils import resolve_device
    from ..fileio import read_jsonl
    from .analyze import split_features, split_report
    ckpt_path = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    device = resolve_device(cfg.train.device)
    # no feature cache in a point's folder: each point is evaluated once, and its folder must hold only
    # what training wrote (a point stopped before its first checkpoint is restarted from an empty one)
    run = FrozenRun.open(ckpt_path, device=device, batch_size=cfg.train.eval_batch_size, cache=False)
    ckpt = run.checkpoint
    records = read_jsonl(run_dir / "metrics.jsonl")
    at_ckpt = next((r for r in records if r.get("epoch") == ckpt.get("epoch")), {})
    final = records[-1] if records else {}
    result = SweepPoint(name=name, point=dict(point), run_dir=name, fewshot={}, phi={}, checkpoint=ckpt_path.name,
                        epoch=ckpt.get("epoch"), base_acc=at_ckpt.get("base_acc"),
                        final_base_acc=final.get("base_acc"), val_mean=at_ckpt.get("val_mean"),
                        held_out_split=cfg.data.test_split, held_out_acc=at_ckpt.get(held_out_key(cfg)),
                        protocol=protocol, config=to_dict(cfg))
    for kind in ["base"] + (["novel"] if cfg.data.novel_split else []):
        feats = split_features(run, kind)
        rep = split_report(feats, cfg.head.name)
        rep.pop("class_names")
        result.phi[kind] = PhiSplit.from_dict(rep, f"{run_dir} phi {kind}")
        if kind == "novel":
            result.fewshot = _novel_fewshot(run, protocol, log)
    return result


# ----------------------------------------------------------------------------- the sweep

Update = Callable[[Path, SweepSummary, bool], None]


def sweep_axis(grid: Mapping[str, Sequence[Any]]) -> str | None:
    """The x axis of the sweep figure: head.margin if swept, else the first all-numeric key."""
    if "head.margin" in grid:
        return "head.margin"
    for key, values in grid.items():
        if key != SEED_KEY and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key
    return None


def run_sweep(config: str | Path | Config, grid: Mapping[str, Sequence[Any]], out_dir: str | Path | None = None, *,
              shots: Sequence[int] | None = None, episodes: int | None = None, method: str | None = None,
              protocols: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              overrides: Sequence[str] = (), log: Callable[[str], None] = print,
              on_update: Update | None = None) -> list[dict[str, Any]]:
    """Train + evaluate every grid point sequentially; returns one result dict per (point, seed) run
    (grid order, seeds innermost, ``SweepPoint.to_dict()``).

    ``config``: a YAML path or a Config; ``overrides``: fixed ``key=value`` for every point;
    ``protocols`` (``5x1``, ``20x1@alphabet``) or ``shots`` (``eval.way`` x shot), ``episodes`` and
    ``method`` default to the config's ``eval`` section. ``seeds``: train every point once per
    ``train.seed`` value (the summary then aggregates mean +/- std over seeds). A point whose loss
    diverges is reported (``"error"`` key, "(diverged)" in the table) and the sweep goes on; it has
    no result.json, so the next run retries it.

    Writes ``result.json`` per point and ``sweep.json`` (``SweepSummary``) after every point; then
    calls ``on_update(out_dir, summary, final)`` (after each point with ``final=False``, once at the
    end with ``True``): the summary table and figure are drawn there (``report.sweep.write_summary``,
    see ``lowshot.pipelines.sweep_with_summary``)."""
    from ..config import apply_overrides
    base = load_config(config, overrides) if not isinstance(config, Config) else apply_overrides(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path(base.out_dir) / f"{base.name}_sweep"
    if shots and protocols:
        raise ConfigError("give the novel protocols either as --shots (eval.way x shot) or as --protocols, not both")
    plan = _plan(base, grid, seeds)
    check_protocol_groups(plan[0][2], protocol_of(plan[0][2], shots, episodes, method, protocols))
    out.mkdir(parents=True, exist_ok=True)
    seed_list = _check_seeds(grid, seeds)
    summary = SweepSummary(grid={k: list(v) for k, v in grid.items()}, axis=sweep_axis(grid), points=[],
                           seeds=seed_list or None)
    for i, (point, name, cfg) in enumerate(plan, 1):
        result = _run_point(out / name, point, name, cfg, protocol_of(cfg, shots, episodes, method, protocols),
                            f"[{i}/{len(plan)}] {name}", log)
        summary.points.append(result)
        _write_results(out, summary)
        if on_update is not None:
            on_update(out, summary, False)  # partial table if interrupted later
    if on_update is not None:
        on_update(out, summary, True)
    return [p.to_dict() for p in summary.points]


def _plan(base: Config, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int] | None
          ) -> list[tuple[dict[str, Any], str, Config]]:
    """(point, name, config) of every run, all resolved first: a typo in the last value must not
    surface after hours of training."""
    points = expand_grid(grid)
    seed_list = _check_seeds(grid, seeds)
    if seed_list:
        points = [{**p, SEED_KEY: s} for p in points for s in seed_list]
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
    return plan


def _run_point(rdir: Path, point: dict[str, Any], name: str, cfg: Config, protocol: dict[str, Any], tag: str,
               log: Callable[[str], None]) -> SweepPoint:
    """Reuse, re-evaluate, resume or train one (point, seed) run; its result (``error`` if diverged)."""
    from ..checkpoint import load_checkpoint
    from ..fileio import write_text_atomic
    from ..train import train
    wanted = to_dict(cfg)
    res_path = rdir / "result.json"
    stored = _read_result(res_path)
    error: str | None = None
    if stored is not None:
        _check_same(stored.config or {}, wanted, rdir)
        if stored.protocol == protocol:
            log(f"{tag}: finished earlier, reusing {res_path}")
            return stored
        log(f"{tag}: evaluation protocol changed, re-evaluating (no retraining)")
    elif (rdir / "last.pt").is_file():
        ck = load_checkpoint(rdir / "last.pt")
        _check_same(ck.get("config", {}), wanted, rdir)
        if ck.get("epoch", 0) < ck["config"]["train"]["epochs"] or ck.get("epoch_step", 0):
            log(f"{tag}: resuming from {rdir / 'last.pt'} (epoch {ck.get('epoch')})")
            error = _train_point(train, cfg, rdir, log, resume=True)
        else:
            log(f"{tag}: trained earlier, evaluating")
    else:
        _check_restartable(rdir)
        log(f"{tag}: training into {rdir}")
        error = _train_point(train, cfg, rdir, log, overwrite=True)
    if error is not None:  # a diverged point is a result of the sweep, not a reason to stop it
        log(f"{tag}: DIVERGED ({error}); not evaluated, retried on the next run")
        return SweepPoint(name=name, point=dict(point), run_dir=name, error=error, fewshot={}, phi={})
    result = evaluate_point(rdir, cfg, protocol, name, point, log)
    write_text_atomic(res_path, json.dumps(result.to_dict(), indent=2))
    log(f"{tag}: {summary_line(result)}")
    return result


def _write_results(out: Path, summary: SweepSummary) -> None:
    from ..fileio import write_text_atomic
    write_text_atomic(out / "sweep.json", json.dumps(summary.to_dict(), indent=2))


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


def _check_restartable(rdir: Path) -> None:
    """A point folder without a checkpoint is restarted from scratch (its folder is emptied): only when
    it holds nothing but what a run writes before its first checkpoint (the rule of ``lowshot train``)."""
    from ..rundir import files_beyond_failed_start
    other = files_beyond_failed_start(rdir) if rdir.is_dir() else []
    if other:
        raise ConfigError(f"{rdir} has no last.pt to resume but holds other files ({', '.join(other[:3])}); "
                          f"move them away or use another --out directory")


def _read_result(path: Path) -> SweepPoint | None:
    """A finished point's result; None when absent or unreadable (a hand-edited file then re-evaluates)."""
    from ..errors import DataError
    if not path.is_file():
        return None
    try:
        return SweepPoint.from_dict(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, DataError):
        return None  # torn write cannot happen (atomic), but a hand-edited file should not crash a sweep


def _check_same(stored: dict[str, Any], wanted: dict[str, Any], rdir: Path) -> None:
    diff = config_difference(stored, wanted)
    if diff is not None:
        raise ConfigError(f"{rdir} was trained with a different config ({diff}); use another --out directory "
                          f"or delete {rdir} to retrain it")


def summary_line(result: SweepPoint) -> str:
    """One log line per evaluated point."""
    acc = result.base_acc if result.base_acc is not None else result.held_out_acc
    what = "base acc" if result.base_acc is not None or result.held_out_acc is None \
        else f"{result.held_out_split} acc"
    parts = [f"{what} {'-' if acc is None else f'{float(acc):.2f}'}"]
    for _, proto, r in fewshot_items(result.to_dict(config=False)):
        parts.append(f"novel {proto.title} {r['mean']:.2f} ± {r['ci95']:.2f}")
    for kind, r in result.phi.items():
        parts.append(f"phi {kind} {_num(r.phi)}")
    return ", ".join(parts)


def _num(x: Any) -> str:
    if x is None:
        return "inf"
    return f"{float(x):.4g}" if math.isfinite(float(x)) else "inf"
