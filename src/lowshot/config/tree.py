"""Plain dicts <-> the typed tree (checked, with suggestions for unknown keys) and ``key=value`` overrides."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Iterable, Union

import yaml

from ..errors import ConfigError
from ..registry import convert
from .schema import Config

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
