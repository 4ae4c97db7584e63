"""Sweep grids: ``KEY=V1,V2,...`` parsing, the Cartesian product, one config per point, and the
config comparison that keeps a sweep folder from silently mixing runs of different configs."""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

from ..config import Config, from_dict, parse_override, set_dotted, to_dict, validate
from ..errors import ConfigError

# keys that do not change what is trained (machine / logging details)
IGNORED_KEYS = ("name", "out_dir", "train.progress", "train.device", "train.eval_batch_size", "train.tensorboard",
                "train.max_steps", "data.root", "data.download", "data.num_workers", "eval.")


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
