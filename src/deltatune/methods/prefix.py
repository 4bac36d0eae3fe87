"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trainable key/value prefixes in every layer.

For layer l the attention runs over ``K = [K_l^prefix; K_l]`` and ``V = [V_l^prefix; V_l]`` with P prefix positions
that every token may attend to. All prefixes together are one matrix ``X`` [P, num_layers * 2 * kv_heads * head_dim]
whose row layout is (layer, key/value, head, dim), exactly PEFT's ``prompt_embeddings``.
Prefix tuning reparameterises ``X = W2 tanh(W1 e + b1) + b2`` with ``e`` [P, d] trainable (only ``X`` is stored);
P-tuning v2 trains ``X`` directly (deep prompts) with dropout on the prefix and, on classification models, a
trainable head. The prefix is written into a transformers ``Cache`` before the first forward, so ``generate()`` and
step-by-step decoding see it as P already-cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_probability
from ..errors import ConfigError, TargetError
from ..kvcache import cache_arg
from ..protocol import initialising
from .virtual_tokens import VirtualTokenConfig, model_dims


class PrefixEncoder(nn.Module):
    """``X`` [P, L*2*H*D] = ``transform(embedding.weight)`` (projection) or ``embedding.weight`` (no projection)."""

    kind = "prefix"

    def __init__(
        self, num_virtual_tokens: int, token_dim: int, num_layers: int, heads: int,
        projection: bool, hidden: int, dropout: float, init: str,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.heads = num_virtual_tokens, num_layers, heads
        self.head_dim = token_dim // heads
        self.projection = projection
        self.dropout = dropout
        width = num_layers * 2 * token_dim
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if init == "zeros" and initialising():
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            if init == "zeros" and initialising():
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        return self.transform(weight) if self.projection else weight

    def stored(self) -> torch.Tensor:
        return self.forward().detach() if self.projection else self.embedding.weight

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each [heads, P, head_dim]; prefix dropout applies in training."""
        flat = F.dropout(self.forward(), self.dropout, self.training)
        grid = flat.view(self.num_virtual_tokens, self.num_layers * 2, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return [(grid[2 * i], grid[2 * i + 1]) for i in range(self.num_layers)]


def check_prefix_support(root: nn.Module) -> None:
    """A prefix goes in through the KV cache: the model (or its backbone, via ``**kwargs``) must take one."""
    if cache_arg(root) is None:
        raise TargetError(
            f"{type(root).__name__} takes no KV cache (neither cache nor past_key_values), so it cannot carry a "
            f"key/value prefix; use prompt tuning (PromptTuningConfig) or P-tuning (PTuningConfig) for this model family"
        )


@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    """Prefix tuning: P key/value prefixes per layer, MLP-reparameterised when ``projection`` is True.

    encoder_hidden_size: the MLP's hidden width (default token_dim); init: "random" (N(0, 1) as PEFT) or "zeros"
    (zero output layer: the prefix starts as zero keys/values); dropout: on the prefix during training.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    method: ClassVar[str] = "prefix"
    peft_keys: ClassVar[dict[str, str]] = {
        **VirtualTokenConfig.peft_keys,
        "projection": "prefix_projection", "encoder_hidden_size": "encoder_hidden_size", "init": "init_weights",
        "dropout": "prefix_dropout",
    }

    projection: bool = True
    encoder_hidden_size: int | None = None
    init: str = "random"
    dropout: float = 0.0

    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        return bool(peft_dict.get("prefix_projection", False))

    def validate(self) -> None:
        super().validate()
        if self.init not in ("random", "zeros"):
            raise ConfigError(f"init must be 'random' or 'zeros', got {self.init!r}")
        check_probability("dropout", self.dropout)
        if self.encoder_hidden_size is not None and (
            isinstance(self.encoder_hidden_size, bool) or not isinstance(self.encoder_hidden_size, int)
            or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")
        if self.token_dim and self.num_attention_heads and self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"token_dim {self.token_dim} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        return ("zero" if value == "zeros" else None) if name == "init" else value

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT has no prefix dropout: the key is written only when it differs from this class's default."""
        data = super().to_peft_dict()
        if self.dropout == type(self).dropout:
            data.pop("prefix_dropout")
        return data

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "init":
            return "zeros" if value == "zero" else "random"
        return 0.0 if name == "dropout" and value is None else value

    def filled(self, root: nn.Module) -> PrefixTuningConfig:
        check_prefix_support(root)
        dims = model_dims(root)
        if not (dims["layers"] and dims["kv_heads"] and dims["head_dim"]) and not (
            self.token_dim and self.num_layers and self.num_attention_heads
        ):
            raise TargetError(
                f"cannot read layers/heads/hidden size from {type(root).__name__}.config; pass token_dim, "
                f"num_layers and num_attention_heads"
            )
        # grouped-query attention: the cache holds kv_heads heads of head_dim each (as PEFT does)
        token_dim = self.token_dim or dims["kv_heads"] * dims["head_dim"]
        return self.replace(
            token_dim=token_dim,
            num_layers=self.num_layers or dims["layers"],
            num_attention_heads=self.num_attention_heads or dims["kv_heads"],
            encoder_hidden_size=self.encoder_hidden_size or token_dim,
        )

    def for_loading(self) -> PrefixTuningConfig:
        return self.replace(projection=False)

    def create_module(self, root: nn.Module) -> nn.Module:
        return PrefixEncoder(
            self.num_virtual_tokens, self.token_dim, self.num_layers, self.num_attention_heads,
            self.projection, self.encoder_hidden_size, self.dropout, self.init,
        )


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2: deep prompts, i.e. the per-layer prefixes trained directly (no reparameterisation), prefix
    dropout 0.1, and a trainable classification head on classification models (``modules_to_save`` default)."""

    method: ClassVar[str] = "ptuning-v2"

    projection: bool = False
    dropout: float = 0.1

    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        return not peft_dict.get("prefix_projection", False)
