"""Typed config tree: dataclasses, YAML files, ``key=value`` overrides, validation with suggestions.

Components never read this tree: the CLI and the trainer unpack it into explicit arguments, so
every library function stays usable without a config. The resolved tree is stored as plain data
(YAML in the run directory, a dict in every checkpoint) so a run can be rebuilt from either.
``schema`` holds the sections, ``tree`` the checked dict <-> tree conversion and overrides,
``files`` the YAML recipes.
"""
from __future__ import annotations

from .files import (PACKAGED_CONFIGS, config_from_checkpoint, dump_yaml, find_config, load_config,
                    packaged_configs)
from .schema import (AffineConfig, AugmentConfig, Config, DataConfig, EvalConfig, HeadConfig, ModelConfig,
                     OptimConfig, ScheduleConfig, TrainConfig, ValConfig)
from .tree import all_keys, apply_overrides, from_dict, parse_override, set_dotted, to_dict, validate

__all__ = ["AffineConfig", "AugmentConfig", "Config", "DataConfig", "EvalConfig", "HeadConfig", "ModelConfig",
           "OptimConfig", "PACKAGED_CONFIGS", "ScheduleConfig", "TrainConfig", "ValConfig", "all_keys",
           "apply_overrides", "config_from_checkpoint", "dump_yaml", "find_config", "from_dict", "load_config",
           "packaged_configs", "parse_override", "set_dotted", "to_dict", "validate"]
