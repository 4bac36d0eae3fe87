"""The fused LoRA op rebuilds an FFN input from its producer's saved tensors instead of saving it (ops.recompute)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.ops import keep_mask, lora_linear, lora_linear_reference, recompute
from deltatune.ops.dora import dora_linear, dora_linear_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from saved_bytes import saved_tensor_bytes  # noqa: E402  (a measurement helper of the benchmarks)

TOL = {"atol": 1e-5, "rtol": 1e-5}
PRODUCERS = {
    "gelu": lambda u, w: F.gelu(u),
    "gelu_tanh": lambda u, w: F.gelu(u, approximate="tanh"),
    "silu": lambda u, w: F.silu(u),
    "mul": lambda u, w: F.silu(u) * w,  # Llama's gated MLP: act(gate) * up
}


def _inputs(tokens: int = 64, width: int = 24):
    torch.manual_seed(0)
    u = torch.randn(tokens, width, requires_grad=True)
    w = torch.randn(tokens, width, requires_grad=True)
    weight, bias = torch.randn(40, width) / width**0.5, torch.randn(40)
    a = (torch.randn(4, width) / width**0.5).requires_grad_()
    b = torch.randn(40, 4).requires_grad_()
    return u, w, weight, bias, a, b


def _saved_storages(y: torch.Tensor) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in y.grad_fn.saved_tensors if t is not None}


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
@pytest.mark.parametrize("p", [0.0, 0.3])  # p = 0: merged path; p > 0: the chunked dropout path on CPU
def test_rebuilt_input_gives_the_plain_formula_and_is_not_saved(producer: str, p: float) -> None:
    u, w, weight, bias, a, b = _inputs()
    x = PRODUCERS[producer](u, w)
    assert recompute.plan(x) is not None
    torch.manual_seed(5)
    y = lora_linear(x, weight, bias, a, b, 0.5, p)
    assert x.untyped_storage().data_ptr() not in _saved_storages(y)
    torch.manual_seed(5)
    keep = keep_mask(x, p) if p > 0 else None
    ref = lora_linear_reference(x, weight, bias, a, b, 0.5, p, keep)
    torch.testing.assert_close(y, ref, **TOL)
    upstream = torch.randn_like(y)
    tensors = [u, w, a, b] if producer == "mul" else [u, a, b]
    fast = torch.autograd.grad(y, tensors, upstream, retain_graph=True)  # x's producer is shared with ref
    for got, want in zip(fast, torch.autograd.grad(ref, tensors, upstream)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("producer", ["gelu", "mul"])
def test_dora_rebuilds_its_input_too(producer: str) -> None:
    u, w, weight, bias, a, b = _inputs()
    magnitude = (weight.norm(dim=1) * 1.1).requires_grad_()
    norm = (weight + 0.5 * b @ a).norm(dim=1)
    x = PRODUCERS[producer](u, w)
    y = dora_linear(x, weight, bias, a, b, magnitude, norm, 0.5)
    assert x.untyped_storage().data_ptr() not in _saved_storages(y)
    ref = dora_linear_reference(x, weight, bias, a, b, magnitude, norm, 0.5)
    torch.testing.assert_close(y, ref, **TOL)
    tensors = [u, a, b, magnitude] + ([w] if producer == "mul" else [])
    upstream = torch.randn_like(y)
    fast = torch.autograd.grad(y, tensors, upstream, retain_graph=True)
    for got, want in zip(fast, torch.autograd.grad(ref, tensors, upstream)):
        torch.testing.assert_close(got, want, **TOL)


def test_other_inputs_are_saved_as_before() -> None:
    """No rebuild for a view, an input changed in place, a product with a constant, or under saved-tensor hooks
    (checkpointing, offloading): x itself is saved and the result is unchanged."""
    u, w, weight, bias, a, b = _inputs()
    cases = {
        "view": F.gelu(u).view(8, 8, 24).view(64, 24),
        "in place": F.gelu(u).add_(1.0),
        "constant factor": u * 0.5,
        "leaf": u,
    }
    for name, x in cases.items():
        assert recompute.plan(x) is None, name
    x = F.gelu(u)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert recompute.plan(x) is None
        y = lora_linear(x, weight, bias, a, b, 0.5, 0.0)
    assert x.untyped_storage().data_ptr() in _saved_storages(y)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), a)[0],
                               torch.autograd.grad(lora_linear_reference(x, weight, bias, a, b, 0.5).sum(), a)[0],
                               **TOL)


def test_input_changed_in_place_after_the_layer_is_an_autograd_error() -> None:
    """Rebuilding reads the producer's saved input; changing that input in place afterwards is caught by
    autograd's version check, as it would be for the producer's own backward."""
    u, w, weight, bias, a, b = _inputs()
    v = u * 1.0
    y = lora_linear(F.gelu(v), weight, bias, a, b, 0.5, 0.0)
    v.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_wrapped_bert_step_keeps_no_ffn_input_and_matches_unfused(dropout: float) -> None:
    """BERT's FFN output projection reads gelu(u): the fused step keeps exactly those inputs' bytes less than
    with the rebuild turned off, and its gradients equal the unfused layers'."""
    from conftest import tiny_bert_model
    from test_ops import _unfused

    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    grads, saved = {}, {}
    for mode in ("fused", "no rebuild", "unfused"):
        model = dt.wrap(tiny_bert_model(), dt.LoraConfig(r=4, alpha=8, dropout=dropout, init="random",
                                                        targets="all-linear")).train()
        torch.manual_seed(11)  # the same dropout masks in every mode
        with pytest.MonkeyPatch.context() as patch, _unfused() if mode == "unfused" else contextlib.nullcontext():
            if mode == "no rebuild":
                patch.setattr(recompute, "plan", lambda x: None)
            out = model(input_ids=ids).last_hidden_state
            saved[mode] = saved_tensor_bytes(out)
            out.square().mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ffn_inputs = 2 * 64 * 64 * 4  # 2 layers, 64 tokens, intermediate width 64, float32
    assert saved["no rebuild"] - saved["fused"] == ffn_inputs
    for name, grad in grads["fused"].items():
        torch.testing.assert_close(grad, grads["unfused"][name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad, grads["no rebuild"][name], atol=1e-5, rtol=1e-4)
