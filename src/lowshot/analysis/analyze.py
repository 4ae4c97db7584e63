"""``lowshot analyze``: discriminability of a checkpoint's features on its base / novel classes.

Features come from the checkpoint's own backbone and test-time preprocessing, so the numbers
describe exactly the embedding that few-shot evaluation uses.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import Config
from ..errors import ConfigError
from ..inference import FrozenRun
from ..results import PhiAnalysis
from .discriminability import discriminability, headline_space, project_2d

Draw = Callable[..., Path]  # (xy [N, 2], class names, path, *, title) -> path of the PNG

SPLIT_KINDS = ("base", "novel")


def resolve_split(cfg: Config, kind: str) -> str:
    """Dataset split for a kind: base -> held-out base images (else the training split), novel -> novel."""
    if kind == "base":
        return cfg.data.test_split or cfg.data.train_split
    if kind == "novel":
        if not cfg.data.novel_split:
            raise ConfigError("the checkpoint's config has no data.novel_split: nothing to analyse as 'novel' "
                              "(use --split base)")
        return cfg.data.novel_split
    raise ConfigError(f"unknown split kind {kind!r} (known: base, novel, both)")


def split_features(run: FrozenRun, kind: str) -> dict[str, Any]:
    """Features, labels and class names of the base or novel split of the run's dataset (the frozen
    run's cached features: the same ones ``lowshot eval`` meta-tests)."""
    split = resolve_split(run.config, kind)
    feats, labels = run.features(split)
    ds = run.dataset(split)
    return {"features": feats, "labels": labels, "class_names": list(ds.class_names), "split": split,
            "dataset": ds}  # dataset order = feature order: ds.sample_groups() lines up with the features


def split_report(feats: dict[str, Any], head_name: str) -> dict[str, Any]:
    """phi (both spaces) of one split's features, plus what they were computed on."""
    out = discriminability(feats["features"], feats["labels"], head_name)
    out.update(split=feats["split"], class_names=feats["class_names"])
    return out


def analyze_checkpoint(checkpoint: str | Path, splits: Sequence[str] | None = None, *,
                       out_dir: str | Path | None = None, projection: str | None = None, classes: int = 5,
                       per_class: int = 200, device: str = "auto", batch_size: int = 256,
                       log: Callable[[str], None] = print, draw: Draw | None = None) -> dict[str, Any]:
    """phi per split; with ``out_dir`` also ``analysis.json`` (``results.PhiAnalysis``) and, with
    ``projection``, ``projection_<split>.png`` drawn by ``draw(xy, names, path, title=...)``
    (``report.figures.plot_projection``; ``lowshot analyze`` passes it, see
    ``lowshot.pipelines.analyze_with_figures``).

    ``splits``: "base" and/or "novel"; None = base, plus novel when the config names a novel split.
    """
    from ..utils import resolve_device
    if projection is not None and projection not in ("pca", "tsne"):
        raise ConfigError(f"unknown projection {projection!r} (known: pca, tsne)")
    if classes < 1 or per_class < 1:
        raise ConfigError("--classes and --per-class must be >= 1")
    if projection is not None:  # fail before extracting features, not after
        if draw is None:
            raise ConfigError("a projection needs a figure writer: pass draw=lowshot.report.figures.plot_projection "
                              "(or use lowshot.pipelines.analyze_with_figures)")
        if projection == "tsne":
            from ..utils import require
            require("sklearn.manifold", "--projection tsne")
    dev = resolve_device(device)
    run = FrozenRun.open(checkpoint, device=dev, batch_size=batch_size)
    cfg, ckpt = run.config, run.checkpoint
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "epoch": ckpt.get("epoch"), "dataset": cfg.data.name,
        "backbone": cfg.model.backbone, "head": cfg.head.name, "margin": cfg.head.margin,
        "headline_space": headline_space(cfg.head.name), "splits": {}, "projections": {},
    }
    out = Path(out_dir) if out_dir is not None else None
    if splits is None:
        splits = ["base"] + (["novel"] if cfg.data.novel_split else [])
    for kind in splits:
        feats = split_features(run, kind)
        result["splits"][kind] = split_report(feats, cfg.head.name)
        if projection is not None and out is not None:
            path = out / f"projection_{kind}.png"
            xy, names = projection_points(feats, method=projection, classes=classes, per_class=per_class,
                                          normalize=result["headline_space"] == "l2")
            draw(xy, names, path, title=f"{cfg.name}: {feats['split']} ({projection.upper()}, "
                                        f"{result['headline_space']} features)")
            result["projections"][kind] = path.name
    log(format_phi_table(result))
    if out is not None:
        from ..fileio import write_text_atomic
        record = PhiAnalysis.from_dict(result, str(out / "analysis.json"))  # the record the report reads
        write_text_atomic(out / "analysis.json", json.dumps(record.to_dict(), indent=2))
        log(f"wrote {out / 'analysis.json'}" + "".join(f", {out / p}" for p in result["projections"].values()))
    return result


def projection_points(feats: dict[str, Any], *, method: str = "pca", classes: int = 5, per_class: int = 200,
                      normalize: bool = False) -> tuple[torch.Tensor, list[str]]:
    """2-D points and class names of the first ``classes`` classes (first ``per_class`` samples each)."""
    labels = feats["labels"]
    keep_classes = torch.unique(labels)[:classes]
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in keep_classes])
    x = feats["features"][idx]
    if normalize:
        x = torch.nn.functional.normalize(x.double(), dim=1)
    return project_2d(x, method), [feats["class_names"][int(c)] for c in labels[idx]]


def format_phi_table(result: dict[str, Any]) -> str:
    """Plain-text table, one row per split."""
    head = f"{'split':<6} {'dataset split':<14} {'classes':>7} {'samples':>8} {'phi':>9} {'space':>5} " \
           f"{'phi raw':>9} {'phi l2':>9} {'D_inter':>10} {'D_intra':>10}"
    title = f"discriminability phi = D_inter / D_intra  ({result.get('head')} head, margin {result.get('margin')})"
    lines = [title, head]
    for kind, r in result["splits"].items():
        space = r["space"]
        lines.append(f"{kind:<6} {r['split']:<14} {r[space]['num_classes']:>7} {r[space]['num_samples']:>8} "
                     f"{_num(r['phi']):>9} {space:>5} {_num(r['raw']['phi']):>9} {_num(r['l2']['phi']):>9} "
                     f"{_num(r[space]['inter']):>10} {_num(r[space]['intra']):>10}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.4g}"
