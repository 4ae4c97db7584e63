"""Subcommands that grow with later features; each adds its parser to ``COMMANDS``."""
from __future__ import annotations

from typing import Any, Callable

COMMANDS: list[Callable[[Any], None]] = []
