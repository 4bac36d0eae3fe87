"""Row stackers (``deltatune.protocol.RowStacker``): methods' own batched paths for mixed-adapter batches.

IA3 and VeRA got theirs without editing ``deltatune.batching``; a delta defined here, outside the library, gets one
the same way. Every row of a mixed batch must equal its single-adapter run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import assert_rows_match_single_runs, mixed_and_per_row_grads, tiny_gpt2, tiny_llama
from deltatune.batching import mixed
from deltatune.layers import DeltaLayer
from deltatune.methods import lora_batched
from deltatune.methods.ia3.batched import IA3InputRows, IA3OutputRows
from deltatune.methods.vera.batched import VeraRows
from deltatune.protocol import Delta, RowStacker, stack_slots

BASE = "__base__"


def ids(shape, seed=1):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def no_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("per-adapter loop used where the stacked path should run")

    monkeypatch.setattr(mixed, "run_each", refuse)


def hosts(model):
    return [h for _, h in model.hosts() if isinstance(h, DeltaLayer)]


def groups(host):
    return {stacker: state for stacker, state, _ in host.__dict__["_mixed_stacks"].groups}


def stacked_family(factory, targets, feedforward, vera_keys):
    """LoRA, DoRA, MoRA, IA3 (input scaling on ``feedforward``, output scaling elsewhere) and two VeRA adapters."""
    model = dt.wrap(factory(), dt.LoraConfig(r=4, alpha=8, targets=targets, init="random"), name="lora")
    model.add_adapter("dora", dt.DoraConfig(r=2, targets=targets, init="random"))
    model.add_adapter("mora", dt.MoraConfig(r=2, targets=targets, init="random"))
    model.add_adapter("ia3", dt.IA3Config(targets=targets, feedforward=feedforward))
    model.add_adapter("vera", dt.VeraConfig(r=6, targets=targets, init="random", projection_prng_key=vera_keys[0]))
    model.add_adapter("vera2", dt.VeraConfig(r=6, targets=targets, init="random", projection_prng_key=vera_keys[1]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name or "lora_magnitude_vector" in name:  # away from 1 / ||W0 + sBA||: the scaling matters
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("few_tokens", [0, 10**6], ids=["gathered-factors", "dense-used-factors"])
@pytest.mark.parametrize("vera_keys", [(1, 1), (1, 2)], ids=["vera-shared-pair", "vera-per-row-pairs"])
@pytest.mark.parametrize(
    "factory, targets, feedforward",
    [(tiny_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"]), (tiny_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"])],
)
def test_ia3_and_vera_rows_are_stacked_and_equal_single_runs(factory, targets, feedforward, vera_keys, few_tokens, monkeypatch):
    monkeypatch.setattr(lora_batched, "FEW_TOKENS", few_tokens)
    model = stacked_family(factory, targets, feedforward, vera_keys)
    no_fallback(monkeypatch)
    assert_rows_match_single_runs(model, ids((9, 7)), ["ia3", "vera", BASE, "lora", "vera2", "dora", "mora", "ia3", "vera"])
    kinds = [set(groups(h)) for h in hosts(model)]
    assert {IA3InputRows, IA3OutputRows} <= set().union(*kinds) and all(VeraRows in k for k in kinds)
    assert all(groups(h)[VeraRows].shared == (vera_keys[0] == vera_keys[1]) for h in hosts(model))


def test_gradients_through_stacked_ia3_and_vera_equal_per_row_gradients(monkeypatch):
    model = stacked_family(tiny_llama, ["k_proj", "down_proj"], ["down_proj"], (1, 2))
    model.set_adapter(["ia3", "vera", "vera2"])  # trainable
    x, rows = ids((4, 5)), ["ia3", "vera", "vera2", "ia3"]
    no_fallback(monkeypatch)
    mixed_grads, single_grads = mixed_and_per_row_grads(model, x, rows)
    assert len(mixed_grads) == 2 * 2 * (1 + 2 * 2)  # 2 blocks x 2 targets x (ia3_l + 2 VeRA adapters x 2 lambdas)
    for n, grad in mixed_grads.items():
        torch.testing.assert_close(grad, single_grads[n], atol=1e-4, rtol=1e-4)


def test_vera_stacks_follow_an_in_place_edit_of_the_shared_projections():
    model = dt.wrap(tiny_llama(), dt.VeraConfig(r=4, init="random", targets=["q_proj"]), "a").eval()
    model.add_adapter("b", dt.VeraConfig(r=4, init="random", targets=["q_proj"]))
    x = ids((2, 4))
    assert_rows_match_single_runs(model, x, ["a", "b"])
    stacks = hosts(model)[0].__dict__["_mixed_stacks"]
    with torch.no_grad():  # loading a file with saved projections writes into these buffers in place
        hosts(model)[0].adapters["b"].projections.vera_B.mul_(-2)
    assert_rows_match_single_runs(model, x, ["a", "b"])
    assert hosts(model)[0].__dict__["_mixed_stacks"] is not stacks and not groups(hosts(model)[0])[VeraRows].shared


# ---- a delta defined outside the library ----------------------------------------------------------------------------
class ShiftRows(RowStacker):
    """``y_i = out_i + gain_k * beta_k``; refuses layers with fewer than 40 input features (the loop runs them)."""

    attributes = ("gain",)

    @classmethod
    def group_key(cls, delta, layer):
        return () if layer.base_layer.in_features >= 40 else None

    @classmethod
    def build(cls, layer, members, n_slots):
        shifts = [(k, d.beta * d.gain) for k, d in members]
        return stack_slots(shifts, n_slots)

    @classmethod
    def apply(cls, state, layer, rows, x, out):
        return out + state[rows.slots].reshape(x.shape[0], *([1] * (out.dim() - 2)), -1)


class Shift(Delta):
    """``y = out + gain * beta``: a per-feature shift scaled by a plain attribute."""

    row_stackers = (ShiftRows,)

    def __init__(self, features: int, seed: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.randn(features, generator=torch.Generator().manual_seed(seed)))
        self.gain = 1.0

    def forward(self, x, out, layer):
        return out + (self.beta * self.gain).to(out.dtype)


def test_a_delta_defined_outside_the_library_is_stacked_through_the_protocol(monkeypatch):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, init="random", targets=["q_proj", "down_proj"]), "lora")
    model.add_adapter("shift", dt.LoraConfig(r=2, targets=["q_proj", "down_proj"]))
    model.eval()
    for host in hosts(model):  # the adapter's deltas replaced by the outside class
        host.adapters["shift"] = Shift(host.base_layer.out_features, seed=host.base_layer.in_features)
    down_proj = next(h for h in hosts(model) if h.base_layer.in_features == 64)
    x, rows = ids((3, 5)), ["shift", BASE, "lora"]
    calls = []
    monkeypatch.setattr(mixed, "run_each", lambda layer, *args: calls.append(layer) or mixed_run_each(layer, *args))
    assert_rows_match_single_runs(model, x, rows)
    assert ShiftRows in groups(down_proj) and calls
    assert all(layer.base_layer.in_features == 32 for layer in calls)  # q_proj: 32 < 40 inputs, looped
    stacks = down_proj.__dict__["_mixed_stacks"]
    down_proj.adapters["shift"].gain = 3.0  # a plain attribute listed in ``attributes``: the stack is rebuilt
    assert_rows_match_single_runs(model, x, rows)
    assert down_proj.__dict__["_mixed_stacks"] is not stacks


mixed_run_each = mixed.run_each
