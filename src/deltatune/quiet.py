"""Filters for log lines that other packages print on every import on a CPU machine and that ask nothing of the user.

torchao (imported by transformers' model code when it is installed) logs one line per CUDA-only extension it cannot
load, and torch logs a deprecation per Enum that torchao registers with pytree. A filter on exactly those loggers
and messages, installed when deltatune is imported, keeps every other warning of theirs.
"""

from __future__ import annotations

import logging

HARMLESS = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropHarmless(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def install() -> None:
    """Add the filters once per process (idempotent)."""
    for name, fragments in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(fragments))
