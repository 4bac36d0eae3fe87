"""NF4 base weights for QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

A weight ``W`` [out, in] is flattened and cut into blocks of ``block_size`` values; each block stores its absmax
``c`` and, per value, the index of the nearest of 16 NormalFloat levels ``q_k`` (quantiles of N(0, 1) scaled to
[-1, 1]) to ``w / c``: ``dequant(w) = q_k * c``. With double quantization the block absmaxes themselves are stored
as int8 (minus their mean, absmax-scaled in blocks of 256), ~0.52 bytes per weight instead of 4 (fp32).

The format and its quantize/dequantize math are torchao's ``NF4Tensor`` (``to_nf4``), used as the ``weight``
Parameter of ``NF4Linear``. torchao always double-quantizes, so ``double_quant=False`` stores the codes (computed
by torchao's own routine) with float32 absmaxes in buffers, and dequantizes them here: ``q[code] * absmax``.

``NF4Linear.forward`` dequantizes the weight inside an autograd function, in forward and again in backward, so
only the 4-bit weight is ever kept between calls. bitsandbytes ``Linear4bit`` bases (transformers'
``BitsAndBytesConfig(load_in_4bit=True)``) are handled by the same helpers (``dequantized_weight``, ``requantize``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DeltatuneError
from .layers import AdapterHost, is_quantized
from .model import DeltaModel
from .protocol import register_strategy
from .targets import base_modules, get_module, resolve_targets, set_module

# torchao's NF4 levels (the paper's 16 quantiles of N(0, 1), normalised to [-1, 1], 4 decimals as torchao stores them)
NF4_LEVELS = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)
REQUANTIZE_WARNING = (
    "merging (or unmerging) an adapter into a 4-bit base re-quantizes the weight, which rounds it: the layer no "
    "longer equals base + delta exactly and unmerge cannot restore the original. For an exact dense model use "
    "merge_and_unload(dequantize=True)"
)


def _torchao() -> Any:
    """torchao's NF4 module, imported quietly (its import logs about CUDA-only kernels on CPU machines)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tq
    except ImportError as error:
        raise DeltatuneError(
            "NF4 quantization needs torchao: pip install 'deltatune[quant]' (or pip install torchao)"
        ) from error
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return tq


def scaler_block_size(n_blocks: int, preferred: int = 256) -> int:
    """Blocks of absmaxes that are double-quantized together: ``preferred`` if it divides ``n_blocks``, else the
    largest divisor of ``n_blocks`` below it (torchao needs an exact division; standard shapes all get 256)."""
    return next(size for size in range(min(preferred, n_blocks), 0, -1) if n_blocks % size == 0)


class _DequantLinear(torch.autograd.Function):
    """``y = x W^T`` with ``W = module.dequantize()`` rebuilt in forward and in backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: NF4Linear) -> torch.Tensor:
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.module.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in NF4: ``y = (x_c @ dequant(W)_c^T + b_c)`` cast back to
    ``x.dtype``, where ``_c`` is ``compute_dtype`` (None: the input's dtype). The bias stays dense."""

    deltatune_kind = "linear"  # adapters treat it as a Linear (layers.layer_kind)
    deltatune_quantized = True  # merges dequantize, edit, re-quantize (layers.DeltaLayer)

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int = 64, double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> NF4Linear:
        return cls(linear.weight.detach(), linear.bias, **kwargs)

    @torch.no_grad()
    def _store(self, weight: torch.Tensor) -> None:
        """Quantize a dense [out, in] weight into this module's storage."""
        weight = weight.detach().to(self.weight_dtype).contiguous()
        n_blocks = weight.numel() // self.block_size
        tq = _torchao()
        if self.double_quant:
            nf4 = tq.to_nf4(weight, self.block_size, scaler_block_size(n_blocks))
            self.weight = nn.Parameter(nf4, requires_grad=False)
            return
        float_weight = weight.float()
        levels = torch.tensor(NF4_LEVELS, device=weight.device)
        codes = tq.NF4Tensor.convert_to_norm_float_weight(float_weight, n_blocks, self.block_size, levels)
        absmax = float_weight.view(n_blocks, self.block_size).abs().amax(1)
        self.register_buffer("weight_nf4", codes)
        # float32 bits kept in an int32 buffer, so model.to(dtype) cannot round the scales
        self.register_buffer("weight_absmax", absmax.view(torch.int32))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight ``q[code] * absmax`` in ``dtype`` (default: the original weight dtype)."""
        dtype = dtype or self.weight_dtype
        if self.double_quant:
            weight = self._parameters["weight"]
            if type(weight).__name__ != "NF4Tensor":
                raise DeltatuneError(
                    "this NF4Linear's weight was turned into a dense tensor (model.to(dtype) / .half() dequantize "
                    "torchao NF4 weights); cast the model before quantize_nf4, move it with .to(device) only"
                )
            return weight.get_original_weight().to(dtype)
        packed = self.weight_nf4
        codes = torch.stack((packed >> 4, packed & 0b1111), dim=-1).view(-1).long()
        levels = torch.tensor(NF4_LEVELS, device=packed.device)
        absmax = self.weight_absmax.view(torch.float32)
        dense = levels[codes].view(-1, self.block_size) * absmax[:, None]
        return dense.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        out = _DequantLinear.apply(x.to(dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantized weight (original dtype) and this module's bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


# ---- helpers shared by NF4Linear and bitsandbytes Linear4bit --------------------------------------------------------
def _bnb_weight(module: nn.Module) -> Any:
    """A bitsandbytes Params4bit in its canonical layout (bnb repacks it for its CPU inference kernel)."""
    weight = module._parameters["weight"]
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return weight


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense [out, in] weight of a quantized layer, in its original dtype (a new tensor)."""
    if isinstance(module, AdapterHost):
        module = module.base_layer
    if isinstance(module, NF4Linear):
        return module.dequantize()
    import bitsandbytes.functional as bnbf

    weight = _bnb_weight(module)
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def requantize(module: nn.Module, dense: torch.Tensor) -> None:
    """Store a dense weight back into a quantized layer (rounds: warns)."""
    warnings.warn(REQUANTIZE_WARNING, UserWarning, stacklevel=4)
    if isinstance(module, AdapterHost):
        module = module.base_layer
    if isinstance(module, NF4Linear):
        module._store(dense)
        return
    import bitsandbytes as bnb

    old = _bnb_weight(module)
    state = old.quant_state
    new = bnb.nn.Params4bit(
        dense.to(state.dtype).contiguous(), requires_grad=False, blocksize=state.blocksize,
        compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=old.quant_storage, module=module,
    )
    module.weight = new.to(old.device)


def dequantize_module(module: nn.Module) -> nn.Linear:
    """A dense ``nn.Linear`` equivalent of a quantized layer (bias shared, weight dequantized)."""
    if isinstance(module, NF4Linear):
        return module.to_linear()
    weight = dequantized_weight(module)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = module.bias
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer (also under adapter hosts) by its dense ``nn.Linear``; returns ``model``."""
    for path, module in list(base_modules(model)):
        if not is_quantized(module):
            continue
        if isinstance(module, AdapterHost):
            module.swap_base(dequantize_module(module.base_layer))
        else:
            set_module(model, path, dequantize_module(module))
    return model


def _quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def quantize_nf4(
    model: nn.Module,
    targets: list[str] | str = "all-linear",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    exclude: list[str] | str | None = None,
) -> nn.Module:
    """Swap the frozen ``nn.Linear`` layers selected by ``targets`` for ``NF4Linear`` in place; returns ``model``.

    ``targets``/``exclude`` follow the adapter-config rules ("all-linear" leaves output heads such as lm_head or
    classifier dense). Quantize before ``dt.wrap``; the result is deterministic, so an adapter saved from a QLoRA
    model loads onto a freshly quantized copy of the same base with identical outputs. Layers whose size is not a
    multiple of ``block_size`` stay dense (a warning lists them).
    """
    if isinstance(model, DeltaModel):
        raise ConfigError("quantize the base model before wrapping it: dt.quantize_nf4(base); dt.wrap(base, config)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ConfigError(f"block_size must be a positive even integer, got {block_size!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ConfigError(f"compute_dtype must be a floating torch dtype or None, got {compute_dtype!r}")
    _torchao()
    paths = resolve_targets(model, targets, exclude, is_supported=_quantizable)
    skipped = []
    for path in paths:
        linear = get_module(model, path)
        if linear.weight.numel() % block_size or not linear.weight.is_floating_point():
            skipped.append(path)
            continue
        quantized = NF4Linear.from_linear(
            linear, block_size=block_size, double_quant=double_quant, compute_dtype=compute_dtype
        )
        quantized.train(linear.training)
        set_module(model, path, quantized)
        del linear
    if skipped:
        warnings.warn(
            f"{len(skipped)} layers stay dense because their size is not a multiple of block_size={block_size}: "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
            UserWarning,
            stacklevel=2,
        )
    return model


def nf4_bytes(module: nn.Module) -> int:
    """Bytes held by the quantized weights of ``module`` (codes, scales, their metadata; biases excluded)."""
    total = 0
    for sub in module.modules():
        sub = sub.base_layer if isinstance(sub, AdapterHost) else sub
        if isinstance(sub, NF4Linear):
            if sub.double_quant:
                weight = sub._parameters["weight"]
                names, _ = weight.__tensor_flatten__()
                total += sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)
            else:
                total += sum(b.numel() * b.element_size() for b in (sub.weight_nf4, sub.weight_absmax))
    return total


register_strategy("dequantize", dequantized_weight)
register_strategy("requantize", requantize)
register_strategy("dequantize_model", dequantize_model)

__all__ = [
    "NF4Linear", "NF4_LEVELS", "dequantize_model", "dequantize_module", "dequantized_weight", "nf4_bytes",
    "quantize_nf4", "requantize", "scaler_block_size",
]
