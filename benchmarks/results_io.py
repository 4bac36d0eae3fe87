"""Shared by the experiment scripts: write a results JSON atomically (``deltatune.io.atomic_write``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.io import atomic_write


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON at ``path``; a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
