"""Principal-subspace LoRA initialisations: PiSSA (Meng et al. 2024, arXiv 2404.02948) and OLoRA (Buyukakyuz 2024,
arXiv 2406.01775).

- PiSSA: ``W0 = U S V^T``; ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, so ``s B A`` is the top-r part.
- OLoRA: ``W0 = Q R``; ``A = R[:r]``, ``B = Q[:, :r]``.
In both the base weight is replaced in place by the residual ``W0 - s B A``, so the wrapped model starts out
computing exactly the base function, while training moves the principal directions.

Saving: like PEFT's conversion, ``dt.save`` writes a *plain* LoRA of rank 2r that applies to the original base
weights: ``A' = [A; A0]``, ``B' = [B, -B0]`` (``s B' A' = s B A - s B0 A0``), with r and alpha doubled (alpha * sqrt 2
for rsLoRA) and ``init_lora_weights: true``; the initial A0, B0 are kept as non-persistent buffers for this.
Caveat: deleting or unloading (without merging) a PiSSA/OLoRA adapter leaves the residual in the base weights;
use ``merge_and_unload()`` to get the fine-tuned weights, or reload the base model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TargetError
from ..layers import DeltaLayer

if TYPE_CHECKING:
    from ..model import DeltaModel

PRINCIPAL_INITS = {"pissa", "olora"}


def principal_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) from an [out, in] weight, in float32, with ``s B A`` the principal rank-r part."""
    w = weight.detach().float()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    q, upper = torch.linalg.qr(w)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def principal_init(model: DeltaModel, name: str, paths: list[str], init: str) -> None:
    """Set A, B of adapter ``name`` from each layer's weight and subtract ``s B A`` from the weight."""
    from .lora import LoraLinear

    hosts = [model.host_at(path, DeltaLayer) for path in paths]
    for path, host in zip(paths, hosts):
        if type(host.adapters[name]) is not LoraLinear:
            raise TargetError(f"init={init!r} supports Linear and Conv1D layers only; exclude '{path}'")
        if host.weight_for_merge is not host._parameters.get("weight"):
            raise TargetError(f"init={init!r} rewrites the base weight; '{path}' is quantized: initialise, then quantize")
        r = host.adapters[name].lora_A.weight.shape[0]
        if r > min(host.weight_for_merge.shape):
            raise TargetError(f"init={init!r} needs r <= min(in, out); '{path}' has shape {tuple(host.weight.shape)}")
    with torch.no_grad():
        for host in hosts:
            delta = host.adapters[name]
            weight = host.weight_for_merge
            oi = weight.T if delta.fan_in_fan_out else weight
            a, b = principal_factors(oi, delta.lora_A.weight.shape[0], delta.scaling, init)
            delta.lora_A.weight.copy_(a)
            delta.lora_B.weight.copy_(b)
            delta.register_buffer("initial_A", delta.lora_A.weight.detach().clone(), persistent=False)
            delta.register_buffer("initial_B", delta.lora_B.weight.detach().clone(), persistent=False)
            residual = oi.float() - delta.scaling * (delta.lora_B.weight.float() @ delta.lora_A.weight.float())
            weight.copy_((residual.T if delta.fan_in_fan_out else residual).to(weight.dtype))


def export_plain_lora(
    model: DeltaModel, name: str, data: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rewrite a PiSSA/OLoRA adapter as a rank-2r plain LoRA relative to the original base weights."""
    layers = [(path, host.adapters[name]) for path, host in model.hosts()
              if isinstance(host, DeltaLayer) and name in host.adapters]
    if not any(hasattr(delta, "initial_A") for _, delta in layers):
        return data, tensors  # loaded from a file, not initialised here: saved as it was read
    tensors = dict(tensors)
    for path, delta in layers:
        initial_a, initial_b = delta.initial_A, delta.initial_B
        tensors[f"{path}.lora_A.weight"] = torch.cat((delta.lora_A.weight.detach(), initial_a), dim=0)
        tensors[f"{path}.lora_B.weight"] = torch.cat((delta.lora_B.weight.detach(), -initial_b), dim=1)
    factor = math.sqrt(2) if data.get("use_rslora") else 2
    data = dict(data)
    data["r"] = 2 * data["r"]
    data["lora_alpha"] = factor * data["lora_alpha"]
    data["rank_pattern"] = {k: 2 * v for k, v in (data.get("rank_pattern") or {}).items()}
    data["alpha_pattern"] = {k: factor * v for k, v in (data.get("alpha_pattern") or {}).items()}
    data["init_lora_weights"] = True
    return data, tensors
