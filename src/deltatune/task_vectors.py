"""Task-vector algebra on dense weight updates: task arithmetic, TIES, DARE, magnitude pruning, truncated SVD.

Every function takes the task vectors ``T_i`` (one dense ``dW`` per adapter, same shape) and weights ``w_i``:

* linear / svd:       ``sum_i w_i T_i``
* magnitude_prune:    ``sum_i w_i trim(T_i)``; ``trim`` keeps the ``int(density * numel)`` largest ``|T_i|``
* ties (Yadav et al. 2023, "TIES-Merging"): trim each ``T_i``, elect the sign per entry
  (``sign(sum_i trim(T_i))``, or with ``majority_sign_method="frequency"`` the sign most entries have), then the
  disjoint mean ``sum_i w_i t_i [sign t_i = elected] / #{i: sign t_i = elected}``
* dare_linear / dare_ties (Yu et al. 2024, "Language Models are Super Mario"): like linear / ties, but each
  ``T_i`` is first dropped at random with p = 1 - density and the survivors rescaled by ``1 / (1 - p)``
  (a seeded ``torch.Generator``, so a combination is reproducible)

The weighting and sign-election conventions are HF PEFT's (``merge_utils``), so ``ties_svd`` on plain LoRA equals
PEFT's; the difference from PEFT is *what* they are applied to: always the dense ``dW_i``, never the A and B
factors separately (which adds cross terms ``A_i B_j``).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

COMBINATION_TYPES = (
    "cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}  # the base name, after dropping "_svd"


def base_type(combination_type: str) -> str:
    """The dense rule behind a type name: ``ties_svd`` -> ``ties``, ``svd`` -> ``linear``."""
    name = combination_type[: -len("_svd")] if combination_type.endswith("_svd") else combination_type
    return "linear" if name in ("svd", "cat") else name


def check_combination(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    """Raise ``ConfigError`` for an unknown type, a missing/invalid density, or an unknown sign method."""
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type {combination_type!r} is unknown; use one of {', '.join(COMBINATION_TYPES)}")
    if base_type(combination_type) in NEEDS_DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(
                f"combination_type {combination_type!r} needs density in (0, 1] (the fraction of entries kept), "
                f"got {density!r}"
            )
    elif density is not None:
        raise ConfigError(
            f"density only applies to ties/dare/magnitude_prune types, not {combination_type!r}; drop it"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")


def magnitude_trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (density 1: unchanged)."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k).indices] = 1
    return tensor * mask.view(tensor.shape)


def dare_drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p = 1 - density and rescale the survivors by ``1 / (1 - p)``."""
    if density >= 1:
        return tensor
    keep = torch.rand(tensor.shape, generator=generator, device=generator.device) < density
    return tensor * keep.to(tensor.device, tensor.dtype) / density


def elected_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, which task vectors agree with the elected sign (``>= 0`` elects +, as in PEFT)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1.0, -1.0).to(stacked.dtype)


def combine_dense(
    tensors: list[torch.Tensor],
    weights: list[float],
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The combined task vector for one layer (see the module docstring for each type's formula)."""
    rule = base_type(combination_type)
    if rule in ("ties", "magnitude_prune"):
        tensors = [magnitude_trim(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        tensors = [dare_drop(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if rule in ("ties", "dare_ties"):
        agree = elected_sign_mask(stacked, majority_sign_method)
        kept = (stacked * w * agree).sum(dim=0)
        return kept / agree.sum(dim=0).clamp(min=1).to(stacked.dtype)
    return (stacked * w).sum(dim=0)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B [m, k], A [k, n], relative error)`` with ``B A`` the best rank-k approximation of ``matrix``
    (Eckart-Young); the singular values are split evenly, ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``, and the
    error is ``||M - B A||_F / ||M||_F`` (0 for a zero matrix), computed from the discarded singular values.
    k is capped at the numerical rank of ``matrix`` (singular values above ``s_max * max(m, n) * eps``, at least 1):
    directions of value ~0 would only cost parameters."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = float(s[0]) * max(matrix.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    k = max(1, min(rank, int((s > tolerance).sum())))
    root = s[:k].sqrt()
    total = float(s.double().square().sum())
    rest = float(s[k:].double().square().sum())
    error = math.sqrt(rest / total) if total > 0 else 0.0
    return u[:, :k] * root, root[:, None] * vh[:k], error
