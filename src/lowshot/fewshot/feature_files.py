"""Bring your own features: few-shot and generalized few-shot evaluation of a features file.

``lowshot eval --features FILE`` runs the episodic protocol of ``lowshot eval --checkpoint`` on
features from any model (CLIP, DINOv2, your own). FILE is an ``.npz`` or a ``.pt`` dict (loaded
with ``weights_only=True``) holding:

* ``features`` — ``N x D`` floats (finite);
* ``labels`` — ``N`` integer class ids;
* ``class_names`` (optional) — strings, ``class_names[i]`` names label ``i`` (in messages, and
  checked against a checkpoint's base classes in the generalized setting);
* ``group_<KEY>`` (optional) — one group id per sample (strings or ints) for ``--within KEY``,
  e.g. ``group_alphabet``; ``lowshot embed --split`` writes one per class-metadata key of the
  dataset (``ImageDataset.sample_groups``);
* ``head`` (optional) — the training head of the model (``lowshot embed`` writes it): its family
  sets the fine-tune head of ``method=finetune`` exactly as ``lowshot eval --checkpoint`` does
  (``method_kwargs_for_head``). Without it (foreign features) the fine-tune head is ``cosine``
  (``FEATURES_HEAD``: a fresh cosine classifier, the Baseline++ / mmfewshot preset); give
  ``head=linear`` (and e.g. ``bias=false scale=5``) as a method option for a linear head.

Protocol defaults are ``EvalConfig``'s (5-way, shots 1 and 5, 15 queries, 2000 episodes,
``finetune``, seed 0). Same table and JSON record as the checkpoint path.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

GROUP_PREFIX = "group_"
FEATURES_HEAD = "cosine"
SUFFIXES = (".npz", ".pt", ".pth")


@dataclass
class FeatureFile:
    """A loaded, checked features file (see the module docstring for the keys)."""

    path: Path
    features: Tensor
    labels: Tensor
    class_names: list[str] | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    head: str | None = None

    def group(self, key: str) -> np.ndarray:
        """Per-sample group ids for ``--within key``; one error naming the groups the file has."""
        if key not in self.groups:
            have = ", ".join(GROUP_PREFIX + k for k in sorted(self.groups)) or "none"
            raise DataError(f"{self.path}: no group array {GROUP_PREFIX + key!r} for --within {key} "
                            f"(group arrays in the file: {have}; `lowshot embed --split` writes one per "
                            f"class-metadata key)")
        return self.groups[key]

    @property
    def num_classes(self) -> int:
        return int(torch.unique(self.labels).numel())


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"features file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown features file type {path.suffix!r} (use .npz or .pt)")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise DataError(f"{path}: an array holds Python objects (pickled); store strings as a unicode "
                                f"array, e.g. np.array(list_of_str)") from None
            raise DataError(f"{path}: not a readable .npz ({e})") from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{path}: not a readable .npz ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling errors have no common class)
        msg = str(e)
        if "Unsupported global:" in msg:   # the one useful line of torch's long message
            what = msg.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
            reason = f"it pickles a Python object ({what}); store tensors, lists of str/int and dicts only"
        else:
            reason = (msg.strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not loadable with torch.load(weights_only=True): {reason}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a .pt features file must hold a dict with 'features' and 'labels', "
                        f"got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


def _array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()   # numpy has no bfloat16
    return np.asarray(value)


def load_feature_file(path: str | Path, *, need_labels: bool = True) -> FeatureFile:
    """Read and check a features file; every problem is one ``DataError`` naming the file and cause."""
    path = Path(path)
    raw = _read(path)
    for key in ("features", "labels") if need_labels else ("features",):
        if key not in raw:
            hint = (" (`lowshot embed --images` writes features and paths only: add one integer class id per "
                    "row, or embed a class-per-folder tree with `lowshot embed --split SPLIT --dataset "
                    "image_folder --root DIR`)") if key == "labels" else ""
            raise DataError(f"{path}: no {key!r} array (keys: {', '.join(sorted(raw)) or 'none'}){hint}")
    x = _array(raw["features"])
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{path}: 'features' must be N x D (samples x dims), got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: 'features' must be numbers, got dtype {x.dtype}")
    feats = torch.from_numpy(np.ascontiguousarray(x))
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.to(torch.float32)
    bad = ~torch.isfinite(feats).all(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise DataError(f"{path}: 'features' contain NaN/Inf in {int(bad.sum())} rows (first: row {row})")
    n = feats.shape[0]
    labels = torch.zeros(0, dtype=torch.int64)
    if "labels" in raw:
        y = _array(raw["labels"])
        if y.ndim != 1 or y.shape[0] != n:
            raise DataError(f"{path}: 'features' has {n} rows but 'labels' has shape {y.shape} (need {n} labels)")
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.array_equal(y, np.round(y))):
            raise DataError(f"{path}: 'labels' must be integer class ids, got dtype {y.dtype}")
        labels = torch.from_numpy(y.astype(np.int64))
        if int(labels.min()) < 0:
            raise DataError(f"{path}: 'labels' must be >= 0, got {int(labels.min())}")
    names = None
    if "class_names" in raw:
        c = _array(raw["class_names"])
        if c.ndim != 1:
            raise DataError(f"{path}: 'class_names' must be a 1-D list of strings, got shape {c.shape}")
        names = [str(v) for v in c.tolist()]
        if labels.numel() and int(labels.max()) >= len(names):
            raise DataError(f"{path}: label {int(labels.max())} has no name: 'class_names' has {len(names)} entries")
    groups: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if key.startswith(GROUP_PREFIX):
            g = _array(value)
            if g.ndim != 1 or g.shape[0] != n:
                raise DataError(f"{path}: {key!r} must give one group id per sample ({n}), got shape {g.shape}")
            groups[key[len(GROUP_PREFIX):]] = g
    head = raw.get("head")
    head = None if head is None else str(_array(head).reshape(-1)[0]) if _array(head).size else None
    return FeatureFile(path, feats, labels, names, groups, head)


def _in_file(path: Path, fn: Any, *args: Any, **kw: Any) -> Any:
    """Run ``fn``; a DataError (too few classes, a class too small, ...) gets the file's name."""
    try:
        return fn(*args, **kw)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _default_out(path: Path, prefix: str, method: str, within: str | None) -> Path:
    return path.parent / f"{prefix}_{path.stem}_{method}{f'_within-{within}' if within else ''}.json"


def run_features_eval(path: str | Path, *, way: int | None = None, shots: Sequence[int] | None = None,
                      query: int | None = None, episodes: int | None = None, method: str | None = None,
                      seed: int | None = None, options: dict[str, Any] | None = None, within: str | None = None,
                      device: str = "auto", out: str | Path | None = None, log: Any = print) -> dict[str, Any]:
    """``lowshot eval --features FILE``: the checkpoint path's table and JSON on a features file.

    Unset protocol values are ``EvalConfig``'s defaults; ``within`` names a ``group_<KEY>`` array
    of the file. Returns the record written to ``out`` (default: ``eval_<stem>_features_<method>_<protocol>.json``
    next to FILE, with the protocol in the name as for checkpoints).
    """
    from ..fileio import write_text_atomic
    from ..config import EvalConfig
    from ..utils import resolve_device
    from .api import default_eval_name, evaluate, format_table, given, method_kwargs_for_head
    from .evaluators import EVALUATORS
    e = EvalConfig()
    way, query, episodes, seed = given(way, e.way), given(query, e.query), given(episodes, e.episodes), given(seed, e.seed)
    shots = list(given(shots, e.shots))
    ff = load_feature_file(path)
    method = EVALUATORS.canonical(method or e.method)
    groups = ff.group(within) if within else None
    head = ff.head or FEATURES_HEAD
    kw = method_kwargs_for_head(head, method, options)
    log(f"features: {ff.path}, {ff.features.shape[0]} samples, {ff.num_classes} classes, {ff.features.shape[1]}-d"
        + (f"; episodes within one {within} ({len(set(groups.tolist()))} groups)" if groups is not None else ""))
    results = []
    for shot in shots:
        res = _in_file(ff.path, evaluate, ff.features, ff.labels, way=way, shot=shot,
                       query=query, episodes=episodes, method=method,
                       seed=seed, class_names=ff.class_names, groups=groups,
                       device=resolve_device(device), **kw)
        res = {k: v for k, v in res.items() if k != "accuracies"} | {"accuracies": list(map(float, res["accuracies"]))}
        results.append(res)
    log(format_table(results))
    record = {"features": str(ff.path), "head": head, "within": within,
              "options": {k: v for k, v in kw.items() if isinstance(v, (str, int, float, bool))},
              "results": results}
    out_path = Path(out) if out else ff.path.parent / default_eval_name(
        ff.path.stem, "features", method, way=way, shots=shots, query=query, episodes=episodes, seed=seed,
        options=options, within=within)
    write_text_atomic(out_path, json.dumps(record, indent=1))
    log(f"wrote {out_path}")
    return record


# ----------------------------------------------------------------------------- generalized few-shot

def _same_classes(a: FeatureFile, names: list[str] | None, what: str) -> None:
    """Refuse base files whose label ids name other classes than the base classifier's rows."""
    if a.class_names is None or names is None:
        return
    for i in sorted(set(a.labels.tolist())):
        if i >= len(names) or a.class_names[i] != names[i]:
            theirs = names[i] if i < len(names) else "nothing"
            raise DataError(f"{a.path}: label {i} is {a.class_names[i]!r} but {theirs!r} in {what} "
                            f"(base labels must index the same base classes)")


def run_features_generalized(path: str | Path, *, base_features: str | Path,
                             base_train_features: str | Path | None = None, val_features: str | Path | None = None,
                             checkpoint: str | Path | None = None, way: int | None = None,
                             shots: Sequence[int] | None = None, query: int | None = None,
                             base_query: int | None = None, episodes: int | None = None,
                             val_episodes: int | None = None, calibrations: Sequence[str] = ("none",),
                             method: str | None = None, seed: int | None = None, base_val_fraction: float = 0.5,
                             options: dict[str, Any] | None = None, device: str = "auto",
                             out: str | Path | None = None, log: Any = print) -> Any:
    """``lowshot eval --features NOVEL --generalized --base-features BASE``: generalized few-shot on files.

    ``path``: novel-class features (the episodes). ``base_features``: held-out base-class images
    (labels index the base classes), split per class by ``split_heldout`` into the base queries of
    the validation and of the test episodes, exactly as the checkpoint path splits ``base_test``.
    The base classifier is the trained head of ``checkpoint`` when given (its ``class_names`` must
    match the base files'), else the NCM over ``base_train_features`` (base training images); with
    ``method="ncm"`` it is always that NCM. ``val_features`` (val classes) feed the calibration
    episodes of every calibration but ``none``. Protocol defaults: ``EvalConfig``'s, or the
    checkpoint config's ``eval`` section when a checkpoint is given. Returns the ``GeneralizedReport``.
    """
    from ..fileio import write_text_atomic
    from ..config import EvalConfig
    from ..utils import resolve_device
    from .generalized import BaseClassifier, evaluate_generalized, format_generalized_table, split_heldout
    novel = load_feature_file(path)
    base = load_feature_file(base_features)
    e = EvalConfig()
    method = method or "auto"
    clf = None
    source: dict[str, Any] = {"features": str(novel.path), "base_features": str(base.path),
                              "base_val_fraction": base_val_fraction}
    ref_names = base.class_names
    if checkpoint is not None:
        from ..inference import FrozenRun
        run = FrozenRun.open(checkpoint, device="cpu")   # its head and config only: no dataset is read
        e = run.config.eval
        ref_names = run.class_names or None
        _same_classes(base, ref_names, f"the checkpoint's base classes ({run.path})")
        source.update(checkpoint=str(run.path), head=run.head_name, margin=run.config.head.margin)
        if method != "ncm":
            clf = BaseClassifier.from_head(run.model.head)
    arrays: dict[str, Any] = {}
    if clf is None:
        if base_train_features is None:
            raise ConfigError("generalized eval on features needs a base classifier: --checkpoint CKPT (its trained "
                              "head) or --base-train-features TRAIN.npz (NCM over the base training features)")
        train = load_feature_file(base_train_features)
        _same_classes(train, ref_names, str(base.path) if checkpoint is None else "the checkpoint's base classes")
        arrays.update(base_train_features=train.features, base_train_labels=train.labels)
        source["base_train_features"] = str(train.path)
    val_idx, test_idx = _in_file(base.path, split_heldout, base.labels, base_val_fraction, 0)
    need_val = [c for c in calibrations if c != "none"]
    if need_val:
        if val_features is None:
            raise ConfigError(f"calibration {need_val[0]!r} is fitted on validation episodes: give --val-features "
                              f"VAL.npz (features of the val classes)")
        val = load_feature_file(val_features)
        arrays.update(val_features=val.features, val_labels=val.labels,
                      base_val_features=base.features[val_idx], base_val_labels=base.labels[val_idx])
        source["val_features"] = str(val.path)
    opts = dict(options or {})
    kw = {k: opts.pop(k) for k in ("criterion", "chunk_size", "ncm_metric") if k in opts}
    for f in (novel, base):
        log(f"features: {f.path}, {f.features.shape[0]} samples, {f.num_classes} classes, {f.features.shape[1]}-d")
    try:
        report = evaluate_generalized(
            base.features[test_idx], base.labels[test_idx], novel.features, novel.labels, base_classifier=clf,
            way=way or e.way, shots=list(shots or e.shots), query=query or e.query, base_query=base_query,
            episodes=episodes or e.episodes, val_episodes=val_episodes, calibrations=list(calibrations),
            method=method, seed=e.seed if seed is None else seed, finetune=opts or None,
            device=resolve_device(device), source=source, **arrays, **kw)
    except DataError as err:
        raise DataError(f"generalized eval on {novel.path}: {err}") from None
    log(format_generalized_table(report))
    out_path = Path(out) if out else _default_out(novel.path, "generalized", report.method, None)
    write_text_atomic(out_path, json.dumps(report.to_dict(), indent=1))
    log(f"wrote {out_path}")
    return report
