"""Training: data loading, tasks and metrics, the trainer, and the run/compare/eval machinery behind the CLI."""

from __future__ import annotations

from .data import DataError, Fields, load_splits, read_rows
from .settings import RunSettings

__all__ = ["DataError", "Fields", "RunSettings", "load_splits", "read_rows"]
