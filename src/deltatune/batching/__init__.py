"""Mixed-adapter batches (``model(..., adapter_names=[...])``): one adapter per row, batched where exact.

Library API, not serving: ``DeltaLayer`` and the virtual-token host reach these through the strategies installed
here (``deltatune.protocol``), so the core never imports this package.
"""

from __future__ import annotations

from ..protocol import register_strategy
from .mixed import forward_mixed
from .virtual import mixed_virtual_tokens

register_strategy("mixed_forward", forward_mixed)
register_strategy("mixed_virtual_tokens", mixed_virtual_tokens)

__all__ = ["forward_mixed", "mixed_virtual_tokens"]
