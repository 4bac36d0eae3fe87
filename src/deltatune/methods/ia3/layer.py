"""IA3 deltas: one learned vector ``l`` (``ia3_l``, initialised to ones) that rescales a layer's features.

* ``IA3Output`` (keys, values, any non-feedforward target): ``y = l * (W x + b)``; the whole base output, bias
  included, is scaled, so merging gives ``W' = diag(l) W``, ``b' = l * b``.
* ``IA3Input`` (``feedforward`` targets, e.g. the FFN down-projection): ``y = W (l * x) + b``; merging gives
  ``W' = W diag(l)``, bias unchanged.

Shapes and file keys follow HF PEFT: ``ia3_l`` is [out, 1] (output) or [1, in] (input) for ``nn.Linear`` and
transformers' ``Conv1D`` (whose weight is [in, out], so the vector is transposed against it when merging), and
[1, C, 1, ...] for ``nn.Conv2d`` / ``nn.Conv3d`` (C = out or in channels). The file key is ``<path>.ia3_l``.
Merging multiplies the weight in float32; unmerging divides by ``l`` again, and entries whose ``l`` is exactly
zero (which a division cannot undo) are kept aside at merge time and put back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import MergeError
from ...protocol import Delta, initialising
from .batched import IA3InputRows, IA3OutputRows


class IA3Delta(Delta):
    """A per-feature scaling vector ``ia3_l``; subclasses say which side of the layer it scales.

    kind: the layer kind ("linear", "conv1d_t" or "conv"); groups: the conv's groups (input scaling of a grouped
    conv repeats ``l`` per group when merged).
    """

    mergeable = True
    scales_output = True

    def __init__(self, features: int, kind: str, init_ones: bool, kernel_dims: int = 0, groups: int = 1) -> None:
        super().__init__()
        if kind == "conv":
            shape: tuple[int, ...] = (1, features) + (1,) * kernel_dims
        else:
            shape = (features, 1) if self.scales_output else (1, features)
        if not initialising():  # a file fills it (protocol.no_init)
            self.ia3_l = nn.Parameter(torch.empty(shape))
        else:
            self.ia3_l = nn.Parameter(torch.ones(shape) if init_ones else torch.randn(shape))
        self.kind = kind
        self.groups = groups
        self.fan_in_fan_out = kind == "conv1d_t"
        self._kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def activation_scale(self) -> torch.Tensor:
        """``l`` shaped to broadcast against the scaled activations ([..., C] or [N, C, *spatial])."""
        return self.ia3_l if self.kind == "conv" else self.ia3_l.flatten()

    def weight_scale(self, layer: Any) -> torch.Tensor:
        """``l`` (float32) shaped to broadcast against the layer's weight, along the axis this delta scales."""
        vec = self.ia3_l.detach().float()
        if self.kind == "conv1d_t":
            return vec.T  # Conv1D stores [in, out]
        if self.kind != "conv":
            return vec
        if self.scales_output:
            return vec.transpose(0, 1)  # [out, 1, 1, ...]
        if self.groups == 1:
            return vec
        weight = layer.weight_for_merge  # [out, in / groups, *kernel]: each group reads its own slice of vec
        per_group = vec.reshape(self.groups, 1, weight.shape[1], *vec.shape[2:])
        return per_group.expand(self.groups, weight.shape[0] // self.groups, *per_group.shape[2:]).reshape(
            weight.shape[0], weight.shape[1], *vec.shape[2:]
        )

    def _bias(self, layer: Any) -> torch.Tensor | None:
        return getattr(layer.base_layer, "bias", None) if self.scales_output else None

    def merged_weight(self, layer: Any) -> torch.Tensor:
        """The float32 weight after merging: ``W * l`` along the scaled axis."""
        return layer.weight_for_merge.detach().float() * self.weight_scale(layer)

    def delta_weight(self, layer: Any) -> torch.Tensor:
        """``dW = W * l - W`` for the current (unmerged) weight; an output delta also scales the bias (not in dW)."""
        return self.merged_weight(layer) - layer.weight_for_merge.detach().float()

    def merge_into(self, layer: Any, safe: bool = True) -> None:
        weight, bias = layer.weight_for_merge, self._bias(layer)
        scale = self.weight_scale(layer)
        merged = weight.detach().float() * scale
        bias_scale = self.ia3_l.detach().float().flatten()
        if safe and not (torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias * bias_scale).all())):
            raise MergeError("merging IA3 would put NaN/inf into the weights; nothing was changed")
        zero = (scale == 0).expand_as(weight)
        self._kept = None
        if zero.any():  # W * 0 cannot be divided back: keep the originals of those entries
            kept_bias = bias.detach()[bias_scale == 0].clone() if bias is not None else None
            self._kept = (zero, weight.detach()[zero].clone(), kept_bias)
        weight.data.copy_(merged.to(weight.dtype))
        if bias is not None:
            bias.data.copy_((bias.detach().float() * bias_scale).to(bias.dtype))

    def unmerge_from(self, layer: Any) -> None:
        weight, bias = layer.weight_for_merge, self._bias(layer)
        scale = self.weight_scale(layer)
        bias_scale = self.ia3_l.detach().float().flatten()
        safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        weight.data.copy_((weight.detach().float() / safe_scale).to(weight.dtype))
        if bias is not None:
            safe_bias = torch.where(bias_scale == 0, torch.ones_like(bias_scale), bias_scale)
            bias.data.copy_((bias.detach().float() / safe_bias).to(bias.dtype))
        if self._kept is not None:
            zero, values, kept_bias = self._kept
            weight.data[zero] = values.to(weight.dtype)
            if bias is not None and kept_bias is not None:
                bias.data[bias_scale == 0] = kept_bias
            self._kept = None

    def extra_repr(self) -> str:
        return f"ia3_l={tuple(self.ia3_l.shape)}, kind={self.kind}"


class IA3Output(IA3Delta):
    """``y = l * base(x)``: the base output (bias included) scaled per output feature."""

    row_stackers = (IA3OutputRows,)  # mixed-adapter batches: each row's l gathered from a stack

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: Any) -> torch.Tensor:
        return (out.to(self.ia3_l.dtype) * self.activation_scale()).to(out.dtype)


class IA3Input(IA3Delta):
    """``y = base(l * x)`` = ``W (l * x) + b``: the layer's input scaled per input feature (feedforward modules)."""

    transforms_input = True
    scales_output = False
    row_stackers = (IA3InputRows,)  # mixed-adapter batches: each row's input scaled before the one base pass

    def transform_input(self, x: torch.Tensor, layer: Any) -> torch.Tensor:
        return (x.to(self.ia3_l.dtype) * self.activation_scale()).to(x.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: Any) -> torch.Tensor:
        return out
