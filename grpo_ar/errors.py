"""Errors that tell the user what to change."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that must change; the message says which and how."""


def need(ok: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `ok`."""
    if not ok:
        raise ConfigError(msg)


class DataError(ValueError):
    """A malformed dataset row; the message names the source, row and field."""
