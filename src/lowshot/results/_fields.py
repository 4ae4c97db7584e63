"""Checked access to the keys of a JSON record (DataError naming the file and key)."""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import DataError

_MISSING = object()
NUM = (int, float)


def get(d: Mapping[str, Any], key: str, where: str, kind: Any = object, *, optional: bool = False,
         none: bool = False, default: Any = None) -> Any:
    """``d[key]`` checked against ``kind`` (DataError naming ``where`` and the key otherwise)."""
    value = d.get(key, _MISSING)
    if value is _MISSING:
        if optional:
            return default
        raise DataError(f"{where}: missing key {key!r}")
    if value is None and (none or optional):
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        name = getattr(kind, "__name__", None) or "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: key {key!r} should be {name}, got {type(value).__name__} {value!r:.60}")
    return value


def obj(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def num(d: Mapping[str, Any], key: str, where: str, **kw: Any) -> float | None:
    v = get(d, key, where, NUM, none=True, **kw)
    return None if v is None else float(v)
