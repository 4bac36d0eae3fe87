"""Every setting of one training run, JSON-serialisable (it is recorded in ``run.json`` and compared on resume)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

# settings that may differ between an interrupted run and its resumption
VOLATILE = {"resume", "quiet", "out"}


@dataclass
class RunSettings:
    """One run: data + model + method + optimisation. ``lr=None`` uses the method's default learning rate."""

    data: str = ""
    model: str = "minilm"
    method: str = "lora"
    method_options: dict[str, str] = field(default_factory=dict)  # command-line text per config field
    config_values: dict[str, Any] = field(default_factory=dict)  # typed values from --config
    k: int = 2  # last-layers: number of blocks
    task: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    max_length: int = 128
    chat_template: bool = False  # prompt/completion and Alpaca rows as chat turns rendered by the chat template
    label_words: list[str] | None = None  # causal LM on labeled rows: the word of each class (train.label_words)
    max_train: int | None = None
    max_eval: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "linear"
    warmup: float = 0.1  # < 1: fraction of the steps; >= 1: number of steps
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    loraplus_ratio: float | None = None
    head_lr: float | None = None  # lr of the task head (fresh classifier / LM head); None: the same as lr
    seed: int = 0
    bf16: bool = False
    quantize: str | None = None  # "nf4": QLoRA, the frozen base's Linear weights stored 4-bit
    gradient_checkpointing: bool | None = None  # None: on for causal-LM training (deltatune.train.lm_fast)
    checkpoint_every: int = 1  # with checkpointing: every k-th decoder block is checkpointed
    fused_ce: bool = True  # causal LM: fused chunked head + cross-entropy, no full logits (lm_fast)
    group_by_length: bool = True
    eval_every: int = 0  # steps; 0 = at the end of each epoch
    save_every: int = 0  # steps; 0 = whenever evaluating
    metric: str | None = None  # None: accuracy (classification) / loss (causal LM)
    threads: int | None = None
    out: str = "runs/run"
    resume: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.max_length >= 2, "--max-length must be >= 2"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (self.head_lr is None or self.head_lr > 0, "--head-lr must be > 0"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.k >= 1, "--k must be >= 1"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every/--save-every must be >= 0"),
            (self.max_train is None or self.max_train >= 1, "--max-train must be >= 1"),
            (self.max_eval is None or self.max_eval >= 1, "--max-eval must be >= 1"),
            (self.scheduler in ("linear", "cosine", "constant"), "--scheduler must be linear, cosine or constant"),
            (self.task in ("auto", "classification", "causal-lm"), "--task must be auto, classification or causal-lm"),
            (self.quantize in (None, "nf4"), "--quantize must be nf4"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from .preflight import check_numbers, check_optimizer

        check_numbers(self)
        check_optimizer(self.optimizer, self.optimizer_args)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """The settings that define the run's result (for resume / reuse checks)."""
        return {k: v for k, v in self.to_dict().items() if k not in VOLATILE}
