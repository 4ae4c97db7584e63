"""Exceptions for mistakes a user can fix (bad config, missing data, bad checkpoint).

The CLI prints these as one line and exits non-zero without a traceback; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations


class LowshotError(Exception):
    """Base class of user-facing errors."""


class ConfigError(LowshotError, ValueError):
    """Unknown key, wrong type or invalid value in a config."""


class DataError(LowshotError, ValueError):
    """Missing, corrupt or unusable data (names the file / class at fault)."""


class CheckpointError(LowshotError, ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""
