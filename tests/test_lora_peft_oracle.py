"""LoRA equals HF PEFT's LoRA on shared weights, and adapter files travel both ways."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt

peft = pytest.importorskip("peft")


def peft_model(base, **kwargs):
    config = peft.LoraConfig(init_lora_weights=False, **kwargs)
    return peft.get_peft_model(base, config).eval()


def copy_peft_weights_into(ours: dt.DeltaModel, theirs) -> int:
    """Copy every LoRA tensor from a PEFT model into ours by matching module paths; returns the count."""
    their_params = dict(theirs.named_parameters())
    copied = 0
    for key, tensor in dt.io.adapter_tensors(ours, "default").items():
        path, _, leaf = key.rpartition(".")
        module_path, _, kind = path.rpartition(".") if leaf == "weight" else (path, "", leaf)
        name = (
            f"base_model.model.{module_path}.{kind}.default.weight" if leaf == "weight"
            else f"base_model.model.{path}.{leaf}.default"
        )
        with torch.no_grad():
            tensor.copy_(their_params[name])
        copied += 1
    return copied


CASES = [
    ("minilm_cls", ["query", "value", "word_embeddings"], dict(input_ids=torch.randint(0, 30000, (2, 11)))),
    ("llama", ["q_proj", "v_proj", "down_proj", "embed_tokens"], dict(input_ids=torch.randint(0, 128, (2, 9)))),
    ("gpt2", ["c_attn", "c_proj", "wte"], dict(input_ids=torch.randint(0, 128, (2, 9)))),
]


@pytest.mark.parametrize("fixture,targets,inputs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_match_peft(request, fixture, targets, inputs, rslora):
    base = request.getfixturevalue(fixture)
    reference = copy.deepcopy(base)
    theirs = peft_model(reference, r=4, lora_alpha=16, target_modules=targets, use_rslora=rslora)
    ours = dt.wrap(base, dt.LoraConfig(r=4, alpha=16, targets=targets, rslora=rslora)).eval()
    assert copy_peft_weights_into(ours, theirs) > 0
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("fixture,targets,inputs", CASES, ids=[c[0] for c in CASES])
def test_our_file_loads_in_peft_and_theirs_in_ours(request, tmp_path, fixture, targets, inputs):
    base = request.getfixturevalue(fixture)
    pristine = copy.deepcopy(base)
    ours = dt.wrap(base, dt.LoraConfig(r=4, alpha=8, targets=targets, init="random", bias="lora_only")).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.add_(0.01)
        ours_out = ours(**inputs).logits
    ours.save(tmp_path / "ours")

    loaded_in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(loaded_in_peft(**inputs).logits, ours_out, atol=1e-5, rtol=0)

    theirs = peft_model(copy.deepcopy(pristine), r=4, lora_alpha=8, target_modules=targets)
    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = dt.load(copy.deepcopy(pristine), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)


def test_peft_modules_to_save_head_round_trip(minilm_cls, tmp_path):
    inputs = dict(input_ids=torch.randint(0, 30000, (3, 7)))
    pristine = copy.deepcopy(minilm_cls)
    theirs = peft_model(minilm_cls, r=4, target_modules=["query"], modules_to_save=["classifier"])
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_()
        expected = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path)
    ours = dt.load(copy.deepcopy(pristine), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, expected, atol=1e-5, rtol=0)
    ours.save(tmp_path / "again")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.allclose(back(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_conv2d_matches_peft():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.point = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.point(self.conv(x))

    base = Net().eval()
    theirs = peft_model(copy.deepcopy(base), r=2, lora_alpha=4, target_modules=["conv", "point"])
    ours = dt.wrap(base, dt.LoraConfig(r=2, alpha=4, targets=["conv", "point"])).eval()
    assert copy_peft_weights_into(ours, theirs) == 4
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=0)
