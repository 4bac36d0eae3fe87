"""Prompt tuning (Lester et al. 2021) and P-tuning v1 (Liu et al. 2021): virtual tokens at the input.

Prompt tuning: ``inputs_embeds = [E; embed(x)]`` with ``E`` [P, d] trainable (init random N(0, 1), rows of the
vocabulary embedding sampled uniformly, or a text's token embeddings repeated/truncated to P).
P-tuning: ``E = f(e)`` with ``e`` [P, d] trainable and ``f`` a prompt encoder, either an MLP
``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)`` or a BiLSTM (``h`` per direction) followed by
``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``. Only ``E`` is stored (PEFT's ``prompt_embeddings``); a loaded
P-tuning adapter is the stored ``E`` itself (no encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import check_positive_int, check_probability
from ..errors import ConfigError
from ..protocol import initialising
from .virtual_tokens import VirtualTokenConfig, input_embeddings, model_dims

_INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_ENCODER_TO_PEFT = {"mlp": "MLP", "lstm": "LSTM", "none": "MLP"}


class PromptEmbedding(nn.Module):
    """``E = embedding.weight`` [P, d]: the virtual tokens themselves."""

    kind = "prompt"

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def stored(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(PromptEmbedding):
    """``E = f(embedding.weight)`` with ``f`` the MLP or BiLSTM+MLP prompt encoder of P-tuning."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder: str, hidden: int, layers: int, dropout: float) -> None:
        super().__init__(num_virtual_tokens, token_dim)
        self.encoder = encoder
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                token_dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, token_dim)
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)
        if self.encoder == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def stored(self) -> torch.Tensor:
        return self.forward().detach()


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    """Prompt tuning: P trainable virtual-token embeddings prepended to the input embeddings.

    init: "random" (N(0, 1)), "vocab" (embeddings of P uniformly sampled vocabulary ids), "text" (the token
    embeddings of ``init_text``, tokenized with ``tokenizer_name_or_path``, repeated/truncated to P).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    method: ClassVar[str] = "prompt"
    peft_keys: ClassVar[dict[str, str]] = {
        **VirtualTokenConfig.peft_keys,
        "init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text",
        "tokenizer_name_or_path": "tokenizer_name_or_path", "tokenizer_kwargs": "tokenizer_kwargs",
    }

    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        if self.init not in _INIT_TO_PEFT:
            raise ConfigError(f"init must be one of {sorted(_INIT_TO_PEFT)}, got {self.init!r}")
        if self.init == "text" and (not self.init_text or not self.tokenizer_name_or_path):
            raise ConfigError("init='text' needs init_text='...' and tokenizer_name_or_path='<tokenizer folder or id>'")

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        return _INIT_TO_PEFT[value] if name == "init" else value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "init":
            reverse = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}
            return reverse.get(str(value).upper().split(".")[-1], str(value).lower())
        return value

    def filled(self, root: nn.Module) -> PromptTuningConfig:
        dims = model_dims(root)
        return self.replace(
            token_dim=self.token_dim or input_embeddings(root).weight.shape[1],
            num_layers=self.num_layers or dims["layers"],
            num_attention_heads=self.num_attention_heads or dims["heads"],
        )

    def create_module(self, root: nn.Module) -> nn.Module:
        module = PromptEmbedding(self.num_virtual_tokens, self.token_dim)
        if initialising():  # else a file fills them (protocol.no_init)
            self.initialise(module.embedding.weight, root)
        return module

    def initialise(self, weight: torch.Tensor, root: nn.Module) -> None:
        """Fill the [P, d] virtual tokens according to ``init`` ("random": nn.Embedding's N(0, 1) as built)."""
        if self.init == "random":
            return
        with torch.no_grad():
            table = input_embeddings(root).weight
            if self.init == "vocab":
                ids = torch.randint(0, table.shape[0], (self.num_virtual_tokens,), device=table.device)
            else:
                ids = torch.tensor(text_token_ids(self, self.num_virtual_tokens), device=table.device)
            weight.copy_(table[ids].float())


def text_token_ids(config: PromptTuningConfig, count: int) -> list[int]:
    """``init_text``'s token ids, repeated and truncated to ``count``."""
    try:
        from transformers import AutoTokenizer
    except ImportError as error:  # pragma: no cover - transformers is the hf extra
        raise ConfigError("init='text' needs transformers: pip install deltatune[hf]") from error
    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    ids = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)(config.init_text)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {config.init_text!r} has no tokens")
    return (ids * math.ceil(count / len(ids)))[:count]


@dataclass
class PTuningConfig(VirtualTokenConfig):
    """P-tuning v1: virtual tokens produced by a prompt encoder (``encoder="mlp"`` or ``"lstm"``).

    encoder_hidden_size: ``h`` (default: token_dim); encoder_num_layers / encoder_dropout: LSTM layers and dropout
    (the MLP always has 3 linear layers, as in PEFT). ``encoder="none"`` trains the virtual tokens directly (the form
    a loaded adapter takes).
    """

    peft_type: ClassVar[str] = "P_TUNING"
    method: ClassVar[str] = "ptuning"
    peft_keys: ClassVar[dict[str, str]] = {
        **VirtualTokenConfig.peft_keys,
        "encoder": "encoder_reparameterization_type", "encoder_hidden_size": "encoder_hidden_size",
        "encoder_num_layers": "encoder_num_layers", "encoder_dropout": "encoder_dropout",
    }

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder not in _ENCODER_TO_PEFT:
            raise ConfigError(f"encoder must be 'mlp', 'lstm' or 'none', got {self.encoder!r}")
        if self.encoder_hidden_size is not None and (
            isinstance(self.encoder_hidden_size, bool) or not isinstance(self.encoder_hidden_size, int)
            or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        check_probability("encoder_dropout", self.encoder_dropout)

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        return _ENCODER_TO_PEFT[value] if name == "encoder" else value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        return str(value).lower().split(".")[-1] if name == "encoder" else value

    def filled(self, root: nn.Module) -> PTuningConfig:
        dims = model_dims(root)
        token_dim = self.token_dim or input_embeddings(root).weight.shape[1]
        return self.replace(
            token_dim=token_dim,
            num_layers=self.num_layers or dims["layers"],
            num_attention_heads=self.num_attention_heads or dims["heads"],
            encoder_hidden_size=self.encoder_hidden_size or token_dim,
        )

    def for_loading(self) -> PTuningConfig:
        return self.replace(encoder="none")

    def create_module(self, root: nn.Module) -> nn.Module:
        if self.encoder == "none":
            return PromptEmbedding(self.num_virtual_tokens, self.token_dim)
        return PromptEncoder(
            self.num_virtual_tokens, self.token_dim, self.encoder, self.encoder_hidden_size,
            self.encoder_num_layers, self.encoder_dropout,
        )
