"""Atomic file writes: a temp file beside the destination, fsynced, then renamed over it; a killed writer leaves
the old file intact, and its temp file is removed by the next write of the same destination."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, write: Any) -> Path:
    """Write to a temp file next to ``path`` via ``write(tmp_path)`` and fsync it; return the temp path (the
    caller renames it, so several files can be fully written before any replaces an old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the mode any new file would get
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files that killed atomic writes of ``path`` left beside it (``.<name>.<pid>-<random>.tmp``,
    whose writing process no longer runs; the pid-less names of older versions too). A write in progress, in this
    process or a live other one, is never touched. Returns what was removed."""
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        owner = candidate.name[len(path.name) + 2:].partition("-")[0]
        if owner.isdigit() and (int(owner) == os.getpid() or _running(int(owner))):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:  # gone already, or not ours to delete: the write itself goes on
            pass
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number we cannot check): leave its file alone
    return True


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` for a temp file next to ``path``, fsync it, then rename it over ``path``."""
    os.replace(_atomic_write(path, write), path)
