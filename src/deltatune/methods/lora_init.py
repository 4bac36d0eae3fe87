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
from torch import nn

from ..errors import AdapterFileError, TargetError
from ..layers import DeltaLayer, layer_kind
from .base import pattern_value

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


def principal_init(model: DeltaModel, name: str, paths: list[str], init: str, linear_type: type) -> None:
    """Set A, B of adapter ``name`` (deltas of exactly ``linear_type``) from each layer's weight and subtract
    ``s B A`` from the weight."""
    hosts = [model.host_at(path, DeltaLayer) for path in paths]
    for path, host in zip(paths, hosts):
        if type(host.adapters[name]) is not linear_type:
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


def _original_weight(root: nn.Module, path: str, init: str) -> torch.Tensor:
    """W0 [out, in] of the layer at ``path`` of the model a file is loaded onto (before any adapter of that file)."""
    try:
        module = root.get_submodule(path)
    except AttributeError as error:
        raise AdapterFileError(f"the {init} adapter targets '{path}', which this model does not have") from error
    if isinstance(module, DeltaLayer):
        if module.merged:
            raise AdapterFileError(f"'{path}' has merged adapters; unmerge them before loading a {init} adapter")
        module = module.base_layer
    kind = layer_kind(module)
    weight = getattr(module, "weight", None)
    if kind not in ("linear", "conv1d_t") or not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise AdapterFileError(
            f"the {init} adapter needs the plain float weight of '{path}' to re-derive its factors; load it onto the "
            f"unquantized base model (quantize afterwards)"
        )
    return weight.detach().T if kind == "conv1d_t" else weight.detach()


def principal_file_as_plain_lora(
    root: nn.Module, config: Any, tensors: dict[str, torch.Tensor]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """An unconverted PiSSA/OLoRA file rewritten as the plain rank-2r LoRA on the untouched base.

    Such a file (PEFT's ``init_lora_weights: "pissa" | "olora"``, saved without conversion) holds A, B trained
    against the residual base ``W0 - s B0 A0``, with A0, B0 the principal factors of the original W0. PEFT re-derives
    that residual when it loads the file; we re-derive A0, B0 the same way (``principal_factors``) and load the
    equivalent plain LoRA that PEFT's own conversion writes, ``A' = [A; A0]``, ``B' = [B, -B0]`` with r and alpha
    doubled (alpha * sqrt 2 for rsLoRA): ``s B' A' = s (B A - B0 A0)``, the same function, and W0 stays untouched.
    """
    out = dict(tensors)
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b = tensors.get(f"{path}.lora_B.weight")
        r = pattern_value(config.rank_pattern, path, config.r)
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFileError(f"the {config.init} adapter's factors for '{path}' are missing or not of rank {r}")
        weight = _original_weight(root, path, config.init)
        if r > min(weight.shape) or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise AdapterFileError(f"the {config.init} adapter's '{path}' does not fit weight {tuple(weight.shape)}")
        a0, b0 = principal_factors(weight, r, config.scaling(path), config.init)
        out[key] = torch.cat((a, a0.to(a.dtype)), dim=0)
        out[f"{path}.lora_B.weight"] = torch.cat((b, -b0.to(b.dtype)), dim=1)
    factor = math.sqrt(2) if config.rslora else 2
    plain = config.replace(
        init="kaiming", r=2 * config.r, alpha=factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    return plain, out
