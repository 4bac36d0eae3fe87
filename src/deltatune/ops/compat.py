"""The private torch internals the kernels read, and the torch versions they were checked against.

The kernels look at autograd graph nodes (``recompute``: a producer's saved inputs), torch's saved-tensor hook stack
and the global module hook registries (``fusable_base``). These are not public API: on a torch outside
``TESTED_TORCH`` they are not read at all, the kernels decline, and the plain formulas run (same results, the
memory and speed of the plain path).
"""

from __future__ import annotations

import torch

TESTED_TORCH = ((2, 13),)  # (major, minor) releases the suite passed with these internals


def private_api_ok(version: str = torch.__version__) -> bool:
    """Whether this torch release is one the private-API paths were tested with."""
    parts = version.split("+")[0].split(".")
    try:
        release = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return False
    return release in TESTED_TORCH


PRIVATE_API_OK = private_api_ok()
