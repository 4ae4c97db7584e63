"""Novel-class protocols of sweeps (``5x1``, ``20x1@alphabet``) and the names of grid points."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError

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
    """(key, protocol, {"mean", "ci95", ...}) of a sweep point's few-shot results, in stored order.
    Reads today's ``WAYxSHOT[@KEY]`` keys and the shot-only keys (``"1"``) of sweeps written before
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


# ----------------------------------------------------------------------------- point names

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
