"""Typed config tree: dataclasses, YAML files, ``key=value`` overrides, validation with suggestions.

Components never read this tree: the CLI and the trainer unpack it into explicit arguments, so
every library function stays usable without a config. The resolved tree is stored as plain data
(YAML in the run directory, a dict in every checkpoint) so a run can be rebuilt from either.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from .errors import ConfigError
from .registry import convert


@dataclass
class DataConfig:
    """Which dataset and splits to use. ``options`` go to the dataset reader as keywords."""

    name: str = "fashion_mnist"
    root: str | None = None
    train_split: str = "base"
    test_split: str | None = "base_test"  # held-out images of the training classes
    val_split: str | None = "val"  # classes for few-shot validation episodes
    novel_split: str | None = "novel"
    image_size: int | None = None  # None: the reader's default
    download: bool = False
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AffineConfig:
    """Random affine warp per sample (``lowshot.data.transforms.RandomAffine``); zeros = off.

    ``degrees``/``shear``/``translate``: half-widths of symmetric ranges (degrees, degrees,
    fraction of the image side); ``scale``: [lo, hi] zoom.
    """

    degrees: float = 0.0
    translate: float = 0.0
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    shear: float = 0.0
    padding_mode: str = "zeros"  # zeros | border | reflection


@dataclass
class AugmentConfig:
    """Batch augmentation applied on the training device (see ``lowshot.data.transforms``)."""

    crop_scale: list[float] | None = field(default_factory=lambda: [0.6, 1.0])
    flip: bool = True
    jitter: float = 0.0
    affine: AffineConfig = field(default_factory=AffineConfig)
    mean: list[float] | None = None  # None: the dataset's default statistics
    std: list[float] | None = None


@dataclass
class ModelConfig:
    backbone: str = "conv4"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    """Classifier head; ``scale`` None keeps the head's own default."""

    name: str = "cosine"
    margin: float = 0.0
    scale: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warmup, then cosine / multistep / constant."""

    name: str = "cosine"  # cosine | multistep | constant
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1  # warmup starts at lr * warmup_start
    milestones: list[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # GLOBAL batch: split evenly over the processes of a multi-process run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    sampler: str = "instance"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    amp: str | bool = "off"  # off | bf16 | fp16 (YAML reads a bare `off` as false: accepted) (autocast; fp16 needs CUDA, bf16 also runs on CPU)
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    checkpoint_every: int = 0  # also save last.pt every N steps (0: only at epoch ends)
    max_steps_per_epoch: int | None = None  # cap for quick runs
    max_steps: int | None = None  # stop this launch after N global steps, as if interrupted (a resume drops it)
    eval_batch_size: int = 256
    progress: bool = True
    sync_bn: bool = False  # multi-process: BatchNorm statistics over the global batch (docs/distributed.md)
    nan_check_every: int = 50  # steps between finiteness checks (each costs a GPU sync); always before saving
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard/ (docs/runs.md)


@dataclass
class ValConfig:
    """Few-shot validation during training (mmfewshot's best_accuracy_mean model selection)."""

    every: int = 1  # epochs; 0 disables
    episodes: int = 100
    way: int = 5
    shot: int = 1
    query: int = 15
    method: str = "finetune"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    within: str | None = None  # class-metadata key (e.g. alphabet): each episode's classes share its value


@dataclass
class EvalConfig:
    """Few-shot test protocol used by ``lowshot eval`` / the demo when not given on the CLI."""

    way: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    query: int = 15
    episodes: int = 2000
    method: str = "finetune"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    within: str | None = None  # class-metadata key (e.g. alphabet): within-group episodes (docs/fewshot.md)


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- conversion

def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (only str/int/float/bool/None/list/dict): safe for YAML and weights_only."""
    return copy.deepcopy(dataclasses.asdict(cfg))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, for suggestions."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = _dataclass_of(_hints(cls)[f.name])
        if sub is not None:
            keys += all_keys(sub, key + ".")
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type hint ``tp`` with the registries' checker (``registry.convert``:
    ints are accepted where floats are expected); YAML's ``1e-3`` (a string to PyYAML) is a float."""
    value = _yaml_floats(value, tp)
    ok, out = convert(value, tp)
    if not ok:
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return copy.deepcopy(out) if isinstance(out, (dict, list)) else out


def _yaml_floats(value: Any, tp: Any) -> Any:
    """PyYAML reads ``1e-3`` (no dot) as a string: read it as the float the hint asks for."""
    args = typing.get_args(tp)
    if isinstance(value, str) and (tp is float or float in args) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if isinstance(value, (list, tuple)) and typing.get_origin(tp) in (list, tuple) and args[:1] == (float,):
        return [_yaml_floats(v, float) for v in value]
    return value


def _unknown(key: str) -> ConfigError:
    """Error for an unknown dotted key, suggesting the closest sibling key (else any key)."""
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    keys = all_keys()
    siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent):]]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or \
        difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (valid here: {', '.join(siblings)})"
    return ConfigError(f"unknown config key {key!r}{hint}")


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a dataclass tree from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown(full)
        sub = _dataclass_of(hints[key])
        kwargs[key] = from_dict(value or {}, sub, full + ".") if sub else _coerce(value, hints[key], full)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``'head.margin=-0.02'`` -> ``('head.margin', -0.02)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. head.margin=-0.02)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, validating the path against the Config schema."""
    parts = key.split(".")
    cls: type | None = Config
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if cls is not None:
            fields = {f.name for f in dataclasses.fields(cls)}
            if part not in fields:
                raise _unknown(".".join(parts[: i + 1]))
            tp = _hints(cls)[part]
            sub = _dataclass_of(tp)
            if last:
                if sub is not None:
                    raise ConfigError(f"config key {key!r} is a section; set one of its keys instead")
                node[part] = value
                return
            if sub is None and typing.get_origin(tp) is not dict:
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section")
            cls = sub
        elif last:
            node[part] = value
            return
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    data = to_dict(cfg)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return validate(from_dict(data))


# ----------------------------------------------------------------------------- files

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the repository's configs/ links here


def packaged_configs() -> list[str]:
    """Names of the recipes shipped in the package (``omniglot/oneshot``, ...)."""
    return sorted(p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix()
                  for p in PACKAGED_CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))


def find_config(path: str | Path) -> Path:
    """A config file: the path as given, else a packaged recipe by name from any folder.

    ``omniglot/oneshot``, ``omniglot/oneshot.yaml`` and ``configs/omniglot/oneshot.yaml`` all name
    ``lowshot/configs/omniglot/oneshot.yaml`` when no such file exists relative to the current folder.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute():
        rel = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
        for cand in (PACKAGED_CONFIGS.joinpath(*rel), PACKAGED_CONFIGS.joinpath(*rel).with_name(p.name + ".yaml")):
            if rel and cand.is_file():
                return cand
    close = difflib.get_close_matches(p.with_suffix("").as_posix().removeprefix("configs/"), packaged_configs(),
                                      n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else " (packaged recipes: `lowshot train NAME` with NAME one of " \
        f"{', '.join(packaged_configs()[:4])}, ...; all under {PACKAGED_CONFIGS})"
    raise ConfigError(f"config file not found: {path}{hint}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file (may name a ``base:`` file, resolved relative to it) <- overrides.

    ``path`` may also name a packaged recipe (``find_config``). A relative ``data.root`` is made
    absolute (against the current folder, where it was typed), so the stored config still finds
    the data when ``lowshot eval`` runs from another folder.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        data = _read_yaml_tree(path, seen=())
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = apply_overrides(cfg, overrides)
    if cfg.data.root:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    return cfg


def _read_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config 'base:' cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          f"save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml_tree((path.parent / base), seen + (path.resolve(),))
    return _deep_merge(merged, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> Config:
    """Value checks beyond types (ranges and enumerations)."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg}")

    need(cfg.train.epochs >= 0, "train.epochs", "must be >= 0")
    need(cfg.train.batch_size > 0, "train.batch_size", "must be > 0")
    need(cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps",
         "must be a positive number of global steps, or null (no cap)")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.name in ("sgd", "adam", "adamw"), "optim.name", "must be one of sgd, adam, adamw")
    need(cfg.schedule.name in ("cosine", "multistep", "constant"), "schedule.name",
         "must be one of cosine, multistep, constant")
    if cfg.train.amp is False:
        cfg.train.amp = "off"
    need(cfg.train.amp in ("off", "bf16", "fp16"), "train.amp", "must be one of off, bf16, fp16")
    need(cfg.head.scale is None or cfg.head.scale > 0, "head.scale", "must be > 0")
    if cfg.augment.crop_scale is not None:
        lo_hi = cfg.augment.crop_scale
        need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, "augment.crop_scale",
             "must be [lo, hi] with 0 < lo <= hi <= 1, or null")
    af = cfg.augment.affine
    need(af.degrees >= 0, "augment.affine.degrees", "must be >= 0 (half-width of the rotation range)")
    need(af.shear >= 0, "augment.affine.shear", "must be >= 0 (half-width of the shear range)")
    need(0 <= af.translate < 1, "augment.affine.translate", "must be in [0, 1) (fraction of the image side)")
    need(len(af.scale) == 2 and 0 < af.scale[0] <= af.scale[1], "augment.affine.scale",
         "must be [lo, hi] with 0 < lo <= hi")
    need(af.padding_mode in ("zeros", "border", "reflection"), "augment.affine.padding_mode",
         "must be one of zeros, border, reflection")
    need(cfg.val.every >= 0, "val.every", "must be >= 0")
    for key, within in (("val.within", cfg.val.within), ("eval.within", cfg.eval.within)):
        need(within is None or bool(within.strip()), key, "must be a class-metadata key (e.g. alphabet) or null")
    for sec in ("val", "eval"):  # episode protocols: 0 is never "the default", and 1-way is always 100 %
        e = getattr(cfg, sec)
        need(e.way >= 2, f"{sec}.way", "must be >= 2 (a 1-way episode is always 100 % correct)")
        need(e.query >= 1, f"{sec}.query", "must be >= 1")
        need(e.episodes >= 1, f"{sec}.episodes", "must be >= 1")
    need(cfg.val.shot >= 1, "val.shot", "must be >= 1")
    need(bool(cfg.eval.shots) and min(cfg.eval.shots) >= 1, "eval.shots", "must be a non-empty list of ints >= 1")
    return cfg


def config_from_checkpoint(data: dict[str, Any]) -> Config:
    """Rebuild a Config from the plain dict stored in a checkpoint."""
    return validate(from_dict(data))
