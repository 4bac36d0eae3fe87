"""Several methods on one model: LoRA + prefix tuning + Houlsby adapters active together, checked against a
reference built by hand on a plain model (LoRA merged into the weights, the same prefix written into the KV cache,
the bottleneck as forward hooks); partial merges; each adapter saved and loaded on its own."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import assert_rows_match_single_runs
from deltatune.layers import DeltaLayer
from deltatune.methods.virtual_tokens import HOST_NAME

P = 3  # virtual tokens


def ids(shape=(2, 7)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def merge_lora_by_hand(plain: nn.Module, model: dt.DeltaModel, name: str) -> int:
    """W <- W + (alpha / r) B A on the plain copy, from adapter ``name``'s tensors ([in, out] layout for Conv1D)."""
    merged = 0
    with torch.no_grad():
        for path, host in model.hosts():
            if isinstance(host, DeltaLayer) and name in host.adapters:
                lora = host.adapters[name]
                delta = lora.lora_B.weight @ lora.lora_A.weight * model.configs[name].scaling(path)
                weight = plain.get_submodule(path).weight
                weight += delta.T if lora.fan_in_fan_out else delta
                merged += 1
    return merged


def hook_bottleneck_by_hand(plain: nn.Module, model: dt.DeltaModel, name: str) -> int:
    """``out + W_up f(W_down out + b_down) + b_up`` as forward hooks on the plain copy."""
    hooked = 0
    for path, host in model.hosts():
        if isinstance(host, DeltaLayer) and name in host.adapters:
            adapter = host.adapters[name]
            down, up = adapter.adapter_down, adapter.adapter_up
            tensors = [t.detach().clone() for t in (down.weight, down.bias, up.weight, up.bias)]

            def hook(module, args, out, t=tensors, act=adapter.act):
                return out + F.linear(act(F.linear(out, t[0], t[1])), t[2], t[3])

            plain.get_submodule(path).register_forward_hook(hook)
            hooked += 1
    return hooked


def prefix_cache_by_hand(model: dt.DeltaModel, name: str, batch: int):
    """A DynamicCache holding the prefix: ``X = W2 tanh(W1 E + b1) + b2`` [P, L*2*H*D], rows laid out as
    (layer, key/value, head, dim), written as P cached positions of every layer."""
    from transformers.cache_utils import DynamicCache

    encoder = model.model._modules[HOST_NAME].adapters[name]
    config = model.configs[name]
    layers, heads = config.num_layers, config.num_attention_heads
    head_dim = config.token_dim // heads
    first, second = encoder.transform[0], encoder.transform[2]
    with torch.no_grad():
        x = F.linear(torch.tanh(F.linear(encoder.embedding.weight, first.weight, first.bias)), second.weight, second.bias)
    assert x.shape == (P, layers * 2 * heads * head_dim)
    cache = DynamicCache(config=model.model.config)
    for layer in range(layers):
        keys = torch.stack([x[p].view(layers, 2, heads, head_dim)[layer, 0] for p in range(P)], dim=1)
        values = torch.stack([x[p].view(layers, 2, heads, head_dim)[layer, 1] for p in range(P)], dim=1)
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
    return cache


def reference_logits(plain: nn.Module, model: dt.DeltaModel, x: torch.Tensor, prefix: str | None) -> torch.Tensor:
    if prefix is None:
        return logits(plain, x)
    mask = torch.ones(x.shape[0], P + x.shape[1], dtype=torch.long)
    return logits(plain, x, attention_mask=mask, past_key_values=prefix_cache_by_hand(model, prefix, x.shape[0]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("methods", [("lora", "prefix"), ("lora", "houlsby"), ("lora", "prefix", "houlsby")])
def test_combined_methods_equal_hand_built_reference(arch, methods, request):
    base = request.getfixturevalue(arch)
    plain = copy.deepcopy(base)
    lora_targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    configs = {
        "lora": dt.LoraConfig(r=4, alpha=8, init="random", targets=lora_targets),
        "prefix": dt.PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16),
        "houlsby": dt.HoulsbyConfig(bottleneck=4, init="random"),
    }
    model = dt.wrap(base, configs[methods[0]], name=methods[0])
    for name in methods[1:]:
        model.add_adapter(name, configs[name])
    model.set_adapter(list(methods))
    model.eval()
    assert merge_lora_by_hand(plain, model, "lora") == 2 * len(lora_targets)
    if "houlsby" in methods:
        assert hook_bottleneck_by_hand(plain, model, "houlsby") == 4
    x = ids()
    combined = logits(model, x)
    reference = reference_logits(plain, model, x, "prefix" if "prefix" in methods else None)
    assert (combined - reference).abs().max().item() <= 1e-5
    # every method contributes: dropping any one of them changes the output
    for name in methods:
        model.set_adapter([m for m in methods if m != name])
        assert (logits(model, x) - combined).abs().max() > 1e-4, name
    # every parameter of every active method trains
    model.set_adapter(list(methods))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(f"adapters.{m}." in n for n in trainable) for m in methods)


@pytest.mark.parametrize("prefix", [False, True])
def test_partial_merge_keeps_unmergeable_adapters_live(llama, prefix):
    model = dt.wrap(llama, dt.LoraConfig(r=4, init="random", targets="all-linear"), name="lora")
    model.add_adapter("houlsby", dt.HoulsbyConfig(bottleneck=4, init="random"))  # shares o_proj/down_proj with LoRA
    names = ["houlsby", "lora"] + (["prefix"] if prefix else [])
    if prefix:
        model.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=P))
    model.set_adapter(names)
    model.eval()
    x = ids()
    before = logits(model, x)
    model.set_adapter(list(reversed(names)))  # the bottleneck follows the whole layer output in any order
    assert (logits(model, x) - before).abs().max().item() <= 1e-6
    blocked = ["houlsby"] + (["prefix"] if prefix else [])
    with pytest.raises(dt.MergeError, match=r"'houlsby' \(HoulsbyConfig.*skip_unmergeable=True to merge only \['lora'\]"):
        model.merge()
    assert model.merged_adapters == []
    with pytest.warns(UserWarning, match=r"merged \['lora'\]; adapters .* cannot be merged and stay active"):
        assert sorted(model.merge(skip_unmergeable=True)) == sorted(blocked)
    assert model.merged_adapters == ["lora"]
    assert (logits(model, x) - before).abs().max().item() <= 1e-5
    with pytest.raises(dt.MergeError):
        model.merge_and_unload()  # unloading would silently drop the live adapters
    model.unmerge()
    assert model.merged_adapters == [] and (logits(model, x) - before).abs().max().item() <= 1e-5


def test_each_adapter_saves_and_loads_on_its_own(llama, tmp_path):
    fresh_both, fresh_lora, fresh_prefix = (copy.deepcopy(llama) for _ in range(3))
    model = dt.wrap(llama, dt.LoraConfig(r=4, init="random"), name="lora")
    model.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=P))
    model.add_adapter("houlsby", dt.HoulsbyConfig(bottleneck=4, init="random", train_layernorms=True))
    model.eval()
    for name in model.configs:
        model.save(tmp_path / name, adapter=name)
    x = ids()
    alone = {}
    for name in model.configs:
        model.set_adapter(name)
        alone[name] = logits(model, x)
    model.set_adapter(["lora", "prefix", "houlsby"])
    together = logits(model, x)

    loaded = dt.load(fresh_both, tmp_path / "houlsby", name="houlsby")
    loaded.load_adapter(tmp_path / "lora", name="lora")
    loaded.load_adapter(tmp_path / "prefix", name="prefix")
    loaded.set_adapter(["lora", "prefix", "houlsby"])
    assert (logits(loaded.eval(), x) - together).abs().max().item() <= 1e-6
    assert torch.equal(logits(dt.load(fresh_lora, tmp_path / "lora").eval(), x), alone["lora"])
    only_prefix = dt.load(fresh_prefix, tmp_path / "prefix").eval()
    assert (logits(only_prefix, x) - alone["prefix"]).abs().max().item() <= 1e-6


def test_mixed_batch_rows_pick_lora_or_houlsby(bert):
    model = dt.wrap(bert, dt.LoraConfig(r=4, init="random", targets="all-linear"), name="lora")
    model.add_adapter("houlsby", dt.HoulsbyConfig(bottleneck=4, init="random"))
    model.eval()
    x = ids(shape=(4, 7))
    rows = ["houlsby", "lora", "__base__", "houlsby"]
    assert_rows_match_single_runs(model, x, rows)
