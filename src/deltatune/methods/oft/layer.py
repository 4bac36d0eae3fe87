"""OFT's per-layer delta: a learned block-diagonal rotation of the layer *input* (PEFT 0.21's side).

For a Linear layer ``y = W0 x + b`` with ``in`` features split into ``n`` blocks of ``H`` (``n H = in``)::

    x'[.., j, :] = x[.., j, :] @ R_j            (each block of features, as a row vector, times its H x H matrix)
    y            = W0 x' + b                      (the base layer on the rotated input)
    merged       = W0 R^T,  R = block_diag(R_1, .., R_n),   unmerge: W0 = W' R^-T

Each ``R_j`` comes from a skew-symmetric ``Q_j`` whose strict upper triangle (row-major, ``torch.triu_indices``
order) is row ``j`` of the trainable ``oft_R.weight`` [n, H(H-1)/2] (one shared row when ``block_share``):

* ``use_cayley_neumann`` (PEFT's default): ``R = I + 2 sum_{k=1}^{m-1} Q^k + Q^m`` with ``m = max(3, t - 1)`` for
  ``t = num_cayley_neumann_terms >= 3`` (``I + 2Q`` for t = 2, ``I`` for t = 1): the truncated Neumann series of
  ``(I + Q)(I - Q)^-1``, only approximately orthogonal;
* otherwise the exact Cayley transform as PEFT computes it, ``R = (I - Q)(I + Q)^-1`` (the transpose of the above);
* ``coft``: before each use, ``Q_j`` is projected in place (no gradient) onto the Frobenius ball of radius
  ``eps / sqrt(rows of oft_R.weight)``;
* ``module_dropout`` p (training only): ``floor(p n)`` randomly chosen blocks use ``R_j = I`` (not with
  ``block_share``). PEFT 0.21 builds this layer but never calls it, so there its training ignores p.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import MergeError
from ...layers import DeltaLayer
from ...protocol import Delta, initialising


def skew_symmetric(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """[D, H(H-1)/2] strict upper triangles -> [D, H, H] skew-symmetric ``Q`` (``Q = U - U^T``)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], block_size, block_size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Rotation blocks [D, H, H] from skew blocks ``q``, exactly as PEFT 0.21 (see the module docstring)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # R (I + Q) = I - Q
    r = eye.clone()
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def project_coft(packed: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT's constraint: each skew block scaled down to Frobenius norm ``eps / sqrt(D)`` when it is larger."""
    q = skew_symmetric(packed, block_size)
    radius = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    q = torch.where(norm <= radius, q, radius * q / norm)
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    return q[:, rows, cols]


class OFTRotation(nn.Module):
    """Holds ``weight`` [D, H(H-1)/2] (file key ``<layer>.oft_R.weight``) and builds the rotation blocks from it."""

    def __init__(self, rows: int, block_size: int, coft: bool, eps: float, neumann: bool, terms: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2))
        self.block_size, self.coft, self.eps, self.neumann, self.terms = block_size, coft, eps, neumann, terms

    def blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rotation blocks [D, H, H] (after COFT's in-place projection, as PEFT does on every use)."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(project_coft(self.weight, self.block_size, self.eps))
        weight = self.weight if dtype is None else self.weight.to(dtype)
        return cayley(skew_symmetric(weight, self.block_size), self.neumann, self.terms)

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, block_size={self.block_size}, coft={self.coft}, neumann={self.neumann}"


class OFTLinear(Delta):
    """``y = W0 (R x) + b`` via ``transform_input`` (see the module docstring); mergeable as ``W0 R^T``."""

    transforms_input = True
    mergeable = True

    def __init__(
        self, in_features: int, blocks: int, block_size: int, block_share: bool, module_dropout: float,
        coft: bool, eps: float, neumann: bool, terms: int, init: str,
    ) -> None:
        super().__init__()
        self.in_features, self.n_blocks, self.block_size = in_features, blocks, block_size
        self.module_dropout = module_dropout
        self.oft_R = OFTRotation(1 if block_share else blocks, block_size, coft, eps, neumann, terms)
        if init == "random" and initialising():
            with torch.no_grad():
                nn.init.normal_(self.oft_R.weight, mean=0.0, std=0.1)

    def rotation(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[n, H, H]``: one block per group of input features (the shared block repeated with ``block_share``),
        with module dropout applied in training mode."""
        r = self.oft_R.blocks(dtype)
        if self.training and self.module_dropout > 0 and r.shape[0] > 1:
            count = int(self.module_dropout * r.shape[0])
            mask = torch.zeros(r.shape[0], 1, 1, device=r.device, dtype=r.dtype)
            mask[torch.randperm(r.shape[0], device=r.device)[:count]] = 1
            r = (1 - mask) * r + mask * torch.eye(self.block_size, device=r.device, dtype=r.dtype)
        return r.expand(self.n_blocks, -1, -1)

    def transform_input(self, x: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        """``x' = x R`` blockwise on the last dimension, computed in the adapter's dtype, returned in ``x``'s."""
        dtype = self.oft_R.weight.dtype
        blocks = x.to(dtype).unflatten(-1, (self.n_blocks, self.block_size))
        rotated = torch.einsum("...nk,nkc->...nc", blocks, self.rotation())
        return rotated.flatten(-2).to(x.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        return out  # the whole effect is the input rotation

    def merged_weight(self, layer: DeltaLayer) -> torch.Tensor:
        """``W0 R^T`` (float32; computed in float64), i.e. ``W'[o, j, :] = R_j W0[o, j, :]`` per block."""
        weight = layer.weight_for_merge.detach().double().unflatten(1, (self.n_blocks, self.block_size))
        r = self.oft_R.blocks(torch.float64).detach().expand(self.n_blocks, -1, -1).to(weight.device)
        return torch.einsum("ojk,jck->ojc", weight, r).flatten(1).float()

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        """``W0 R^T - W0``: the dense update merging makes to the current weight (task vectors, spectra)."""
        return self.merged_weight(layer) - layer.weight_for_merge.detach().float()

    def merge_into(self, layer: DeltaLayer, safe: bool = True) -> None:
        weight = layer.weight_for_merge
        merged = self.merged_weight(layer)
        if safe and not torch.isfinite(merged).all():
            raise MergeError("merging OFT would put NaN/inf into the weights; nothing was changed")
        weight.data.copy_(merged.to(weight.device, weight.dtype))

    def unmerge_from(self, layer: DeltaLayer) -> None:
        """``W0 = W' R^-T`` (the inverse, not the transpose: the Neumann form is only nearly orthogonal)."""
        weight = layer.weight_for_merge
        merged = weight.detach().double().unflatten(1, (self.n_blocks, self.block_size))
        inverse = torch.linalg.inv(self.oft_R.blocks(torch.float64).detach()).expand(self.n_blocks, -1, -1)
        restored = torch.einsum("ojk,jck->ojc", merged, inverse.to(merged.device)).flatten(1)
        weight.data.copy_(restored.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, blocks={self.n_blocks}, block_size={self.block_size}"
