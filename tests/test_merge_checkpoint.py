"""``dt.merge_checkpoint``: state dict in, merged state dict out, equal to ``load(...).merge_and_unload()``."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from conftest import tiny_gpt2, tiny_llama


def _trained(base: torch.nn.Module, config: dt.DeltaConfig, tmp_path) -> str:
    model = dt.wrap(copy.deepcopy(base), config)
    with torch.no_grad():  # a non-trivial delta: every adapter tensor moves away from its init
        generator = torch.Generator().manual_seed(1)
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save(str(tmp_path / "adapter"))
    return str(tmp_path / "adapter")


CASES = {
    "lora-rslora-patterns": lambda: dt.LoraConfig(r=4, alpha=8, rslora=True, targets="all-linear", rank_pattern={"v_proj": 2}),
    "lora-embedding": lambda: dt.LoraConfig(r=2, targets=["embed_tokens", "q_proj"]),
    "dora": lambda: dt.DoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]),
    "mora": lambda: dt.MoraConfig(r=4, targets=["q_proj", "o_proj"]),
    "asylora": lambda: dt.AsyLoraConfig(r=4, targets=["k_proj"]),
    "ia3": lambda: dt.IA3Config(targets=["k_proj", "down_proj"], feedforward=["down_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_checkpoint_equals_merge_and_unload(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_llama()
    directory = _trained(base, CASES[case](), tmp_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = dt.merge_checkpoint(base.state_dict(), directory)
    expected = dt.load(copy.deepcopy(base), directory).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    changed = [k for k in merged if not torch.equal(merged[k], before[k])]
    assert changed  # the adapter did something
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=1e-6)
    for key, value in base.state_dict().items():  # the input is not modified
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gpt2_conv1d_weights_and_biases_are_merged_in_their_own_layout(method: str, tmp_path) -> None:
    """GPT-2's Conv1D stores [in, out]; IA3 on c_attn scales the bias too (its output side)."""
    torch.manual_seed(0)
    base = tiny_gpt2()
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    config = (dt.LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"]) if method == "lora"
              else dt.IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]))
    directory = _trained(base, config, tmp_path)
    merged = dt.merge_checkpoint(base.state_dict(), directory)
    expected = dt.load(copy.deepcopy(base), directory).merge_and_unload().state_dict()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=1e-6)
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], base.state_dict()["transformer.h.0.attn.c_attn.weight"])
    bias_changed = not torch.equal(merged["transformer.h.0.attn.c_attn.bias"], base.state_dict()["transformer.h.0.attn.c_attn.bias"])
    assert bias_changed == (method == "ia3")


def test_refuses_unmergeable_adapters_and_wrong_bases(tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_llama()
    prompt = _trained(base, dt.PromptTuningConfig(num_virtual_tokens=2), tmp_path / "p")
    with pytest.raises(dt.MergeError, match="not a weight update"):
        dt.merge_checkpoint(base.state_dict(), prompt)
    lora = _trained(base, dt.LoraConfig(r=2, targets=["q_proj"]), tmp_path / "l")
    vera = _trained(base, dt.VeraConfig(r=4, targets=["q_proj"]), tmp_path / "v")
    with pytest.raises(dt.MergeError, match="shared by all its layers"):
        dt.merge_checkpoint(base.state_dict(), vera)
    other = {k.replace("layers.", "blocks."): v for k, v in base.state_dict().items()}
    with pytest.raises(dt.AdapterFileError, match="belongs to no layer"):
        dt.merge_checkpoint(other, lora)
