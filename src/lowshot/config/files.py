"""YAML recipes (with ``base:`` inheritance), packaged configs, validation across keys, checkpoint configs."""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import ConfigError
from .schema import Config
from .tree import apply_overrides, from_dict, to_dict, validate

# ----------------------------------------------------------------------------- files

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the repository's configs/ links here


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


def config_from_checkpoint(data: dict[str, Any]) -> Config:
    """Rebuild a Config from the plain dict stored in a checkpoint."""
    return validate(from_dict(data))
