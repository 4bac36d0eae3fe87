"""LyCORIS methods (HF PEFT's LoHa and LoKr): additive, mergeable weight deltas ``dW = ((w1a w1b) * (w2a w2b)) s``
(Hadamard) and ``dW = kron(w1, w2) s`` (Kronecker), s = alpha / r; see ``config`` for the fields and ``layer`` for
the formulas."""

from .config import LoHaConfig, LoKrConfig, lokr_parameter_count
from .layer import LoHaDelta, LoKrDelta, factorization

__all__ = ["LoHaConfig", "LoKrConfig", "LoHaDelta", "LoKrDelta", "factorization", "lokr_parameter_count"]
