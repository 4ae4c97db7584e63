"""lowshot: low-shot recognition (few-shot and long-tailed) with margin softmax heads."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, LowshotError

__all__ = ["__version__", "LowshotError", "ConfigError", "DataError", "CheckpointError"]
