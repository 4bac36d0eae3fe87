"""QLoRA: NF4 base weights (torchao format), LoRA-family deltas over them, merging, files, bitsandbytes bases."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layers import DeltaLayer
from deltatune.quant import NF4_LEVELS, NF4Linear, dequantized_weight, nf4_bytes

pytest.importorskip("torchao")


def normal_float_levels() -> torch.Tensor:
    """NF4 from its definition (Dettmers et al. 2023, offset 0.9677): 8 positive and 7 negative N(0,1) quantiles
    midway between equal-probability bins, plus an exact zero, normalised to [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return levels / levels.abs().max()


def nearest_level_error(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``min_k |v - q_k|`` for values in [-1, 1]: the error of rounding to the nearest level."""
    index = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2).clamp(0, len(levels) - 1)
    below = (index - 1).clamp_min(0)
    return torch.minimum((values - levels[index]).abs(), (values - levels[below]).abs())


def quantized_llama(llama: nn.Module, compute_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    return dt.quantize_nf4(llama, compute_dtype=compute_dtype)


def nf4_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of the quantized layers (NF4 codes, scales, metadata) by name, cloned."""
    state = {}
    for path, module in model.named_modules():
        base = module.base_layer if isinstance(module, DeltaLayer) else module
        if isinstance(base, NF4Linear):
            weight = base._parameters["weight"]
            names, _ = weight.__tensor_flatten__()
            state.update({f"{path}.{n}": getattr(weight, n).clone() for n in names})
    return state


# ---- the format --------------------------------------------------------------------------------------------------
def test_nf4_levels_are_the_normal_quantiles():
    theory = normal_float_levels()
    assert torch.allclose(torch.tensor(NF4_LEVELS, dtype=torch.float64), theory, atol=5.1e-5)
    stored = NF4Linear(torch.randn(8, 64), None, compute_dtype=None).weight.nf4  # torchao's own LUT
    assert torch.equal(stored, torch.tensor(NF4_LEVELS))


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantization_error_matches_nf4_theory_for_gaussian_weights(double_quant):
    weight = torch.randn(256, 512) * 0.02
    layer = NF4Linear(weight, None, block_size=64, double_quant=double_quant, compute_dtype=None)
    error = (layer.dequantize() - weight).view(-1, 64)
    blocks = weight.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    # nearest-level rounding error of each normalised value: the best any NF4 code can do
    nearest = nearest_level_error(blocks / absmax, levels) * absmax
    if double_quant:  # int8 scales: each block absmax is off by at most range / 127 of its 256-block
        spread = (absmax.view(-1, 256) - absmax.mean()).abs().amax(1)
        bound = nearest + (spread / 127).repeat_interleave(256)[:, None] + 1e-7
        assert (error.abs() <= bound).all()
    else:
        assert torch.allclose(error.abs(), nearest, atol=1e-7)
    # relative RMSE of NF4 with 64-blocks on N(0, s^2) weights: Monte-Carlo expectation from the exact levels
    sample = torch.randn(200_000, 64, dtype=torch.float64)
    top = sample.abs().amax(1, keepdim=True)
    theory = (nearest_level_error(sample / top, normal_float_levels()) * top).square().mean().sqrt()
    measured = error.square().mean().sqrt() / 0.02
    assert abs(measured.item() / theory.item() - 1) < 0.03
    bytes_per_weight = nf4_bytes(layer) / weight.numel()
    assert bytes_per_weight < (0.517 if double_quant else 0.563)


def test_single_quant_codes_match_bitsandbytes_nf4():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(64, 128)
    ours = NF4Linear(weight, None, double_quant=False, compute_dtype=None).dequantize()
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    theirs = bnbf.dequantize_4bit(packed, state)
    # the levels differ only in torchao's 4-decimal rounding (< 5e-5 of a block absmax); that rounding moves the
    # midpoints between levels a little, so a value within ~1e-4 of a midpoint may take the neighbouring code
    absmax = weight.view(-1, 64).abs().amax(1, keepdim=True)
    relative = (ours - theirs).view(-1, 64).abs() / absmax
    assert (relative <= 5.1e-5).float().mean() > 0.999


def test_quantize_nf4_swaps_linears_but_not_heads(llama):
    ids = torch.randint(0, 128, (2, 8))
    reference = llama(ids).logits
    dense_bytes = sum(m.weight.numel() * 4 for m in llama.modules() if type(m) is nn.Linear and m is not llama.lm_head)
    dt.quantize_nf4(llama, compute_dtype=torch.float32)
    layers = [m for m in llama.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14 and type(llama.lm_head) is nn.Linear
    assert nf4_bytes(llama) < 0.16 * dense_bytes
    logits = llama(ids).logits
    assert logits.dtype == torch.float32
    assert 1e-4 < (logits - reference).abs().max() < 0.1 * reference.abs().max()
    with pytest.raises(dt.ConfigError, match="before wrapping"):
        dt.quantize_nf4(dt.wrap(llama, dt.LoraConfig(targets=["q_proj"])))


def test_bf16_compute_and_casts_keep_nf4(llama):
    dt.quantize_nf4(llama)  # compute_dtype bfloat16 by default
    ids = torch.randint(0, 128, (2, 8))
    logits = llama(ids).logits
    assert logits.dtype == torch.float32
    stored = nf4_bytes(llama)
    llama.to(torch.float64)  # a dtype cast must not turn the NF4 weights into dense ones
    assert nf4_bytes(llama) == stored
    assert all(type(m.weight).__name__ == "NF4Tensor" for m in llama.modules() if isinstance(m, NF4Linear))
    assert torch.allclose(llama(ids).logits.float(), logits, atol=1e-6)


# ---- training ------------------------------------------------------------------------------------------------------
def test_qlora_step_changes_only_adapters_and_keeps_no_dense_weight(llama):
    quantized_llama(llama)
    model = dt.wrap(llama, dt.LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "norm" in k}
    codes = nf4_state(model)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    shapes |= {tuple(h.base_layer.weight.shape) for h in model.modules() if isinstance(h, DeltaLayer)}
    saved: list[torch.Tensor] = []
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (3, 7))  # 21 tokens: no activation is shaped like a weight
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    dense_saved = [t for t in saved if t.dim() == 2 and tuple(t.shape) in shapes and type(t) is torch.Tensor]
    assert not dense_saved  # backward re-dequantizes; no dense copy of a base weight lives in the graph
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "lora_" in k}
    assert all(torch.equal(codes[k], v) for k, v in nf4_state(model).items())




@pytest.mark.parametrize("method", ["lora", "dora", "asylora", "mora"])
def test_lora_family_over_nf4_merges_exactly_into_the_dequantized_base(llama, method):
    if method not in dt.METHODS:
        pytest.skip(f"{method} is not registered")
    quantized_llama(llama)
    config = dt.METHODS[method](r=4, targets=["q_proj", "down_proj"], init="random")
    model = dt.wrap(llama, config)
    ids = torch.randint(0, 128, (2, 8))
    expected = model(ids).logits
    host = model.model.model.layers[0].self_attn.q_proj
    base = dequantized_weight(host)
    delta = host.adapters["default"].delta_weight(host)
    plain = model.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, (NF4Linear, DeltaLayer)) for m in plain.modules())
    merged = plain.model.layers[0].self_attn.q_proj
    assert type(merged) is nn.Linear and torch.equal(merged.weight, base + delta)
    assert type(plain.model.layers[1].mlp.up_proj) is nn.Linear  # untargeted layers come back dense too
    assert torch.allclose(plain(ids).logits, expected, atol=1e-5)


def test_merge_into_nf4_warns_and_rounds(llama):
    quantized_llama(llama)
    model = dt.wrap(llama, dt.LoraConfig(r=4, targets=["q_proj"], init="random"))
    ids = torch.randint(0, 128, (2, 8))
    expected = model(ids).logits
    host = model.model.model.layers[0].self_attn.q_proj
    exact = dequantized_weight(host) + host.adapters["default"].delta_weight(host)
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge()
    assert isinstance(host.base_layer, NF4Linear) and type(host.weight).__name__ == "NF4Tensor"
    rounded = dequantized_weight(host)
    assert 0 < (rounded - exact).abs().max() < 0.2 * exact.abs().max()
    assert torch.allclose(model(ids).logits, expected, atol=0.2 * expected.abs().max().item())
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.unmerge()


@pytest.mark.parametrize("double_quant", [True, False])
def test_save_load_onto_freshly_quantized_base_is_exact(tmp_path, double_quant):
    from conftest import tiny_llama

    model = dt.wrap(dt.quantize_nf4(tiny_llama(), double_quant=double_quant), dt.LoraConfig(r=4, targets="all-linear"))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 8))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save(tmp_path)
    reloaded = dt.load(dt.quantize_nf4(tiny_llama(), double_quant=double_quant), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        with model.disable_adapters():
            assert not torch.equal(model(ids).logits, reloaded(ids).logits)


def test_odd_sized_layers_stay_dense_with_a_warning():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.quantize_nf4(model, targets=["0", "2"])
    assert isinstance(model[0], NF4Linear) and type(model[2]) is nn.Linear
    assert any("stay dense" in str(w.message) for w in caught)
    with pytest.raises(dt.ConfigError, match="block_size"):
        dt.quantize_nf4(model, block_size=63)


# ---- bitsandbytes bases ------------------------------------------------------------------------------------------
def test_bitsandbytes_linear4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load_4bit():
        # train mode: in eval mode bitsandbytes repacks 4-bit weights for its CPU kernel (bf16 scales)
        model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
        return model.train()

    model = dt.wrap(load_4bit(), dt.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random"))
    host = model.model.model.layers[0].self_attn.q_proj
    assert type(host.base_layer).__name__ == "Linear4bit" and host.adapters["default"].lora_A.weight.shape == (4, 64)
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 8 and all("lora_" in n for n in grads)
    expected = model(ids).logits.detach()
    model.save(tmp_path / "adapter")
    reloaded = dt.load(load_4bit(), tmp_path / "adapter")
    assert torch.equal(reloaded(ids).logits, expected)
    base = dequantized_weight(host)
    delta = host.adapters["default"].delta_weight(host)
    plain = model.merge_and_unload(dequantize=True)
    merged = plain.model.layers[0].self_attn.q_proj
    assert type(merged) is nn.Linear and torch.equal(merged.weight, base + delta)
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.allclose(plain(ids).logits, expected, atol=1e-4)
