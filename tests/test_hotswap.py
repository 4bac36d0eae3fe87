"""Hot-swap: after prepare_for_hotswap(max_rank), a torch.compile'd model (inductor on CPU) takes LoRA adapters of
any rank <= max_rank, alpha and rsLoRA rule, from a folder or a state dict, with outputs equal to the swapped-in
adapter's and no recompilation (error_on_recompile, and torch._dynamo's graph counter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.io import adapter_tensors


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 12)
        self.v = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.relu(self.q(x)))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))


def mlp() -> Mlp:
    torch.manual_seed(0)
    return Mlp().eval()


def adapter(config: dt.LoraConfig, seed: int) -> dt.DeltaModel:
    torch.manual_seed(seed)
    model = dt.wrap(mlp(), config, "default")
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_compiled_model_takes_new_adapters_without_recompiling(tmp_path) -> None:
    from torch._dynamo.utils import counters

    live = adapter(dt.LoraConfig(r=2, alpha=4, targets=["q", "v"]), 1)
    before = out(live)
    live.prepare_for_hotswap(max_rank=8)
    assert torch.allclose(out(live), before, atol=1e-6)
    low = adapter(dt.LoraConfig(r=6, alpha=3, rslora=True, targets=["q"]), 2)  # other rank, rule, targets
    low.save(tmp_path / "low")
    high = adapter(dt.LoraConfig(r=8, alpha=16, targets=["q", "v"]), 3)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(live, backend="inductor")
    assert torch.allclose(out(compiled), before, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        live.hotswap_adapter(tmp_path / "low", "default")
        assert torch.allclose(out(compiled), out(low), atol=1e-5)
        state = {f"base_model.model.{k}": v for k, v in adapter_tensors(high, "default").items()}
        live.hotswap_adapter(state, "default", config=high.configs["default"])
        assert torch.allclose(out(compiled), out(high), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs == 1
    live.save(tmp_path / "swapped")  # the config was rewritten with the padding: the file is still that adapter
    assert torch.allclose(out(dt.load(mlp(), tmp_path / "swapped")), out(high), atol=1e-5)
    live.add_adapter("other", dt.LoraConfig(r=6, targets=["q"]))  # the usual way: another adapter, other shapes
    live.set_adapter("other")
    out(compiled)
    assert counters["stats"]["unique_graphs"] > graphs  # ... recompiles: the counter does see recompilation


def test_refused_swaps_change_nothing(tmp_path) -> None:
    live = adapter(dt.LoraConfig(r=2, alpha=4, targets=["q"]), 1)
    live.prepare_for_hotswap(max_rank=4)
    before = out(live)
    adapter(dt.LoraConfig(r=6, targets=["q"]), 2).save(tmp_path / "big")
    adapter(dt.LoraConfig(r=2, targets=["q", "v"]), 3).save(tmp_path / "wider")
    with pytest.raises(dt.ConfigError, match="prepare_for_hotswap"):
        live.hotswap_adapter(tmp_path / "big", "default")
    with pytest.raises(dt.ConfigError, match="adapts 'v'"):
        live.hotswap_adapter(tmp_path / "wider", "default")
    with pytest.raises(dt.ConfigError, match="needs config"):
        live.hotswap_adapter({}, "default")
    with pytest.raises(dt.ConfigError, match="max_rank"):
        live.prepare_for_hotswap(max_rank=1)
    with pytest.raises(dt.AdapterFileError, match="lacks adapter_config"):
        live.hotswap_adapter(tmp_path / "missing", "default")
    assert torch.equal(out(live), before)
    dora = dt.wrap(mlp(), dt.DoraConfig(r=2, targets=["q"]), "d")
    dora.add_adapter("l", dt.LoraConfig(r=2, targets=["v"]))
    with pytest.raises(dt.ConfigError, match="LoRA-style"):
        dora.prepare_for_hotswap(max_rank=4, names=["d"])
    dora.prepare_for_hotswap(max_rank=4)  # by default: the LoRA-style adapters only
    assert dora.configs["l"].r == 4 and dora.configs["d"].r == 2
