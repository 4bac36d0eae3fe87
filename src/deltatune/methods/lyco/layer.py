"""The LoHa and LoKr layer deltas: ``out + op(x, dW)`` where ``op`` is ``F.linear`` for Linear layers and the base
layer's own convolution (stride, padding, dilation, groups) for Conv1d/Conv2d, with ``dW`` built from the factors
exactly as HF PEFT builds it (same products, same order, same reshape), so files and outputs match PEFT's."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TargetError
from ...protocol import initialising
from ..base import MergeableDelta


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension`` and ``m <= n`` (LyCORIS/PEFT's rule): ``m = factor`` when it divides
    the dimension, else the divisor pair closest to the square root whose smaller part is at most ``factor``
    (any, for -1). E.g. 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127), 128 with factor 4 -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def conv_shape(module: nn.Module, path: str) -> tuple[tuple[int, ...], dict[str, Any]]:
    """A Conv1d/Conv2d layer's weight shape ``(out, in / groups, *kernel)`` and the settings its convolution uses."""
    if module.padding_mode != "zeros":
        raise TargetError(
            f"'{path}' pads with {module.padding_mode!r}; LoHa/LoKr on convolutions support zero padding only "
            f"(PEFT applies dW with zero padding): exclude that layer"
        )
    settings = {"dim": len(module.kernel_size), "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "groups": module.groups}
    return tuple(module.weight.shape), settings


def _kaiming(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LycoDelta(MergeableDelta):
    """``out + op(x, dW)`` for a ``dW`` given by ``weight()`` (see the subclasses); in training, ``module_dropout``
    skips the delta for the step and ``rank_dropout`` multiplies each output row of dW by a 0/1 mask (divided by the
    mask's mean when ``rescale_rank_dropout``), as PEFT does. There is no input dropout."""

    rescale_rank_dropout = True

    def __init__(
        self, shape: tuple[int, ...], conv: dict[str, Any] | None, r: int, scaling: float, rank_dropout: float,
        module_dropout: float,
    ) -> None:
        super().__init__()
        self.shape, self.conv, self.r, self.scaling = tuple(shape), conv, r, scaling
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def weight(self) -> torch.Tensor:
        """``dW`` in the layout of the layer's weight, differentiable, in the factors' dtype."""
        raise NotImplementedError

    def dropout_p(self) -> float:
        return max(self.rank_dropout, self.module_dropout) if self.training else 0.0

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: Any) -> torch.Tensor:
        if self.training and self.module_dropout > 0 and not torch.rand(1).item() > self.module_dropout:
            return out
        dw = self.weight()
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(dw.shape[0], device=dw.device) > self.rank_dropout).to(dw.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean().clamp_min(torch.finfo(dw.dtype).tiny)
            dw = dw * keep.view(-1, *[1] * (dw.dim() - 1))
        x = x.to(dw.dtype)
        if self.conv is None:
            update = F.linear(x, dw)
        else:
            conv = F.conv1d if self.conv["dim"] == 1 else F.conv2d
            settings = self.conv
            update = conv(x, dw, stride=settings["stride"], padding=settings["padding"], dilation=settings["dilation"],
                          groups=settings["groups"])
        return out + update.to(out.dtype)

    def delta_weight(self, layer: Any) -> torch.Tensor:
        return self.weight().float()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, r={self.r}, scaling={self.scaling:g}"


class LoHaDelta(LycoDelta):
    """LoHa: ``dW = ((hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)) * s``, reshaped to the layer's weight shape;
    w?_a [out, r], w?_b [r, in * kernel]."""

    def __init__(
        self, shape: tuple[int, ...], conv: dict[str, Any] | None, r: int, scaling: float, rank_dropout: float,
        module_dropout: float, init: str,
    ) -> None:
        super().__init__(shape, conv, r, scaling, rank_dropout, module_dropout)
        columns = math.prod(shape[1:])
        self.hada_w1_a = nn.Parameter(torch.zeros(shape[0], r))
        self.hada_w1_b = nn.Parameter(torch.zeros(r, columns))
        self.hada_w2_a = nn.Parameter(torch.zeros(shape[0], r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, columns))
        if not initialising():  # a file fills them (protocol.no_init)
            return
        with torch.no_grad():
            if init == "kaiming":  # PEFT's default: w2_b stays zero, so dW = 0
                _kaiming(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a)
            elif init == "random":
                _kaiming(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)

    def weight(self) -> torch.Tensor:
        scale = torch.tensor(self.scaling, dtype=self.hada_w1_a.dtype, device=self.hada_w1_a.device)
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (product * scale).reshape(self.shape)


class LoKrDelta(LycoDelta):
    """LoKr: ``dW = kron(w1, w2) * s`` reshaped to the layer's weight shape, out = a * b, in = c * d;
    w1 = lokr_w1 [a, c] or lokr_w1_a [a, r] @ lokr_w1_b [r, c]; w2 = lokr_w2 [b, d, *kernel] or
    lokr_w2_a [b, r] @ lokr_w2_b [r, d * kernel]. For a Conv2d with a full w2, w1 gets two trailing unit dims first
    (PEFT's ``make_kron``)."""

    def __init__(
        self, shape: tuple[int, ...], conv: dict[str, Any] | None, r: int, scaling: float, rank_dropout: float,
        module_dropout: float, init: str, factors: tuple[tuple[int, int], tuple[int, int]], full_w1: bool,
        full_w2: bool, rescale_rank_dropout: bool,
    ) -> None:
        super().__init__(shape, conv, r, scaling, rank_dropout, module_dropout)
        self.rescale_rank_dropout = rescale_rank_dropout
        (a, b), (c, d) = factors
        kernel = tuple(shape[2:])
        if full_w1:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r))
            self.lokr_w1_b = nn.Parameter(torch.zeros(r, c))
        if full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.zeros(b, r))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, d * math.prod(kernel)))
        self._init(init)

    def _factors(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        w1 = [self.lokr_w1] if "lokr_w1" in self._parameters else [self.lokr_w1_a, self.lokr_w1_b]
        w2 = [self.lokr_w2] if "lokr_w2" in self._parameters else [self.lokr_w2_a, self.lokr_w2_b]
        return w1, w2

    def _init(self, init: str) -> None:
        """PEFT's inits: "kaiming" zeroes w1 (or w1_a), "lycoris" zeroes w2 (or w2_b), the rest kaiming-uniform;
        "random": all kaiming-uniform. Nothing while ``initialising()`` is False (a file fills them)."""
        if not initialising():
            return
        w1, w2 = self._factors()
        with torch.no_grad():
            _kaiming(*w1, *w2)
            if init == "kaiming":
                w1[0].zero_()
            elif init == "lycoris":
                w2[-1].zero_()

    def weight(self) -> torch.Tensor:
        w1_parts, w2_parts = self._factors()
        w1 = w1_parts[0] if len(w1_parts) == 1 else w1_parts[0] @ w1_parts[1]
        w2 = w2_parts[0] if len(w2_parts) == 1 else w2_parts[0] @ w2_parts[1]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.scaling).reshape(self.shape)
