"""OFT: orthogonal fine-tuning, a learned block-diagonal rotation of each adapted layer's input (PEFT 0.21's OFT)."""

from .config import OFTConfig

__all__ = ["OFTConfig"]
