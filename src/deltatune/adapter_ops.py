"""``DeltaModel``'s adapter-arithmetic and hot-swap methods; the logic lives in ``deltatune.combine`` and
``deltatune.hotswap`` (imported on use: neither imports the model module, so no import cycle)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .combine import CombineReport
    from .config import DeltaConfig


class AdapterArithmetic:
    """Mixed into ``DeltaModel``: combine adapters (PEFT's ``add_weighted_adapter``) and hot-swap them."""

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
        svd_rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
        seed: int = 0, modules_to_save_from: str | None = None,
    ) -> CombineReport:
        """Add LoRA adapter ``adapter_name``, the weighted combination of ``adapters`` defined on their dense
        task vectors ``dW_i`` (``cat``: exactly ``sum_i w_i dW_i``; other types: truncated SVD, error reported in
        the returned ``CombineReport``). See ``deltatune.combine``."""
        from .combine import add_weighted_adapter

        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, density,
                                    majority_sign_method, seed, modules_to_save_from)

    def prepare_for_hotswap(self, max_rank: int, names: list[str] | None = None) -> None:
        """Pad LoRA adapters to rank ``max_rank`` (scaling folded into B) so later swaps keep every shape; call
        it before ``torch.compile``."""
        from .hotswap import prepare_for_hotswap

        prepare_for_hotswap(self, max_rank, names)

    def hotswap_adapter(
        self, source: str | os.PathLike | dict[str, torch.Tensor], name: str, config: DeltaConfig | None = None
    ) -> None:
        """Replace adapter ``name``'s weights in place by those of a LoRA adapter folder (or a PEFT-layout state
        dict with its ``config``): a compiled model does not recompile. See ``deltatune.hotswap``."""
        from .errors import ConfigError
        from .hotswap import hotswap, read_adapter

        tensors: Any
        if isinstance(source, dict):
            if config is None:
                raise ConfigError("hotswap_adapter(state_dict, ...) needs config= (its alpha and r give the scaling)")
            tensors = source
        else:
            config, tensors = read_adapter(source)
        hotswap(self, name, config, tensors)
