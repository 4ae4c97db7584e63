"""Subcommands that live next to their feature; each module exposes ``register(subparsers)``."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

MODULES = [
    "lowshot.fewshot.cli",  # eval
    "lowshot.longtail.cli",  # decouple
    "lowshot.analysis.cli",  # analyze, sweep
    "lowshot.report.cli",  # report
]


def registrars() -> Iterator[Callable[[Any], None]]:
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                # feature (or its package) not part of this build
                continue
            raise
        yield module.register


COMMANDS: list[Callable[[Any], None]] = []
