"""IA3: learned per-feature scaling of keys, values and the FFN down-projection's input (see ``config``)."""

from .config import IA3Config

__all__ = ["IA3Config"]
