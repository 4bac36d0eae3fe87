"""Exceptions raised by deltatune. Every message names the problem and the fix."""

from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class TargetError(DeltatuneError, ValueError):
    """A config's targets do not resolve to supported modules of the model."""


class ConfigError(DeltatuneError, ValueError):
    """A config value or an adapter_config.json is invalid."""


class AdapterFileError(DeltatuneError, OSError):
    """An adapter directory is missing, corrupt, or does not fit the model."""


class MergeError(DeltatuneError, RuntimeError):
    """A merge/unmerge request cannot be carried out safely."""
