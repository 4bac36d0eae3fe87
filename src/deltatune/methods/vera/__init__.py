"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454).

``y = W0 x + lambda_b * (B_s (lambda_d * (A_s drop(x))))``: one frozen random pair A [r, in_max], B [out_max, r]
shared by all adapted layers of an adapter (``A_s``/``B_s`` their top-left slices for a layer's sizes), and two
trainable vectors per layer, ``vera_lambda_d`` [r] (starts at ``d_initial``) and ``vera_lambda_b`` [out] (starts
at 0). Mergeable: ``dW = diag(lambda_b) B_s diag(lambda_d) A_s``. Files: HF PEFT's layout (``peft_type "VERA"``,
``<path>.vera_lambda_b`` / ``<path>.vera_lambda_d``, and once per adapter ``base_model.vera_A`` /
``base_model.vera_B`` when ``save_projection``); the shared pair reaches the file through the delta protocol's
``shared_tensors``.
"""

from .config import VeraConfig

__all__ = ["VeraConfig"]
