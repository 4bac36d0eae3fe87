"""VeRA's per-layer delta and the frozen random projections that all layers of one adapter share.

For a layer with ``in`` inputs and ``out`` outputs::

    y = W0 x + lambda_b * (B[:out, :] (lambda_d * (A[:, :in] drop(x))))
    dW = diag(lambda_b) B[:out, :] diag(lambda_d) A[:, :in]            ([out, in]; transposed for Conv1D)

A [r, in_max] and B [out_max, r] are drawn once per adapter, kaiming-uniform (gain sqrt(2), fan_in = number of
columns: ``U(-b, b)``, ``b = sqrt(3) * sqrt(2) / sqrt(fan_in)``), A first, from a CPU ``torch.Generator`` seeded
with ``projection_prng_key``: the same numbers HF PEFT draws, so a file saved without projections loads identically.
``in_max`` / ``out_max`` are the largest input / output sizes among the adapter's layers; each layer uses the
top-left slice it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import DeltaLayer
from ...protocol import dropout_module, initialising
from ..base import MergeableDelta
from .batched import VeraRows

# PEFT's file keys of the shared projections: one entry per adapter at model level, outside ``base_model.model.``
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
VERA_INITS = ("vera", "random")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``U(-b, b)`` of ``shape`` with ``b = sqrt(3) * gain / sqrt(fan_in)``, gain sqrt(2), fan_in = ``shape[1]``."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)  # cpu: also in no_init


class VeraProjections(nn.Module):
    """The frozen pair one adapter shares across its layers: ``vera_A`` [r, in_max], ``vera_B`` [out_max, r].

    One object is a child of every ``VeraLinear`` of the adapter, so the tensors exist once and follow ``.to()``;
    they are non-persistent buffers: never trained and in no layer's state dict. The adapter file holds them once,
    through the deltas' ``shared_tensors`` (only when ``saved``: PEFT's ``save_projection``).
    """

    def __init__(self, r: int, in_max: int, out_max: int, key: int, saved: bool) -> None:
        """Drawn from ``key``; left on the meta device when built for filling from a file that holds them."""
        super().__init__()
        if saved and not initialising():
            vera_a, vera_b = torch.empty(r, in_max), torch.empty(out_max, r)  # meta inside no_init: a file fills them
        else:
            generator = torch.Generator(device="cpu").manual_seed(key)
            vera_a, vera_b = kaiming_uniform((r, in_max), generator), kaiming_uniform((out_max, r), generator)
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)
        self.saved = saved

    def sliced(self, in_features: int, out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, :in], B[:out, :])`` on ``device`` (a layer on another device than the first gets a copy)."""
        return self.vera_A[:, :in_features].to(device), self.vera_B[:out_features, :].to(device)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {PROJECTION_KEYS[name]: getattr(self, name) for name in PROJECTION_KEYS} if self.saved else {}

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}, saved={self.saved}"


class VeraLinear(MergeableDelta):
    """``out + lambda_b * (B_s (lambda_d * (A_s drop(x))))`` with the shared ``A_s = A[:, :in]``, ``B_s = B[:out, :]``
    (``dW = diag(lambda_b) B_s diag(lambda_d) A_s``, transposed to [in, out] for Conv1D); trainable: ``vera_lambda_b``
    [out] and ``vera_lambda_d`` [r].

    init: "vera" (lambda_d = d_initial, lambda_b = 0: the layer starts as the base), "random" (lambda_b = 1,
    lambda_d ~ N(0, 1): PEFT's ``init_weights=False``).
    """

    row_stackers = (VeraRows,)  # mixed-adapter batches: the layer's VeRA deltas stacked (see ``batched``)

    def __init__(
        self, in_features: int, out_features: int, projections: VeraProjections, dropout: float, d_initial: float,
        init: str, fan_in_fan_out: bool,
    ) -> None:
        super().__init__()
        r = projections.vera_A.shape[0]
        self.in_features, self.out_features, self.fan_in_fan_out = in_features, out_features, fan_in_fan_out
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.vera_lambda_d = nn.Parameter(torch.zeros(r))
        self.projections = projections  # shared child module: the same object in every layer of the adapter
        self.dropout = dropout_module(dropout)
        if not initialising():
            return
        with torch.no_grad():
            if init == "vera":
                self.vera_lambda_d.fill_(d_initial)
            else:  # "random"
                self.vera_lambda_b.fill_(1.0)
                self.vera_lambda_d.normal_()

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        dtype = self.vera_lambda_d.dtype
        a, b = self.projections.sliced(self.in_features, self.out_features, x.device)
        hidden = self.vera_lambda_d * F.linear(self.dropout(x.to(dtype)), a.to(dtype))
        return out + (self.vera_lambda_b * F.linear(hidden, b.to(dtype))).to(out.dtype)

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        """``diag(lambda_b) B_s diag(lambda_d) A_s`` in float32 ([out, in]; [in, out] for Conv1D)."""
        lambda_b, lambda_d = self.vera_lambda_b.float(), self.vera_lambda_d.float()
        a, b = self.projections.sliced(self.in_features, self.out_features, lambda_d.device)
        weight = (lambda_b[:, None] * b.float()) @ (lambda_d[:, None] * a.float())
        return weight.T if self.fan_in_fan_out else weight

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's projections under PEFT's model-level keys (none when they are not saved)."""
        return self.projections.file_tensors()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.vera_lambda_d.shape[0]}"
