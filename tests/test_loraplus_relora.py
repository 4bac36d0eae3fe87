"""LoRA+ parameter groups and ReLoRA restarts (function preserved, optimizer state pruned, jagged LR, high rank)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layers import DeltaLayer

transformers = pytest.importorskip("transformers")


def bert_cls(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(1))


def named_groups(optimizer) -> dict[str, dict]:
    return {group["name"]: group for group in optimizer.param_groups}


def ids_of(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_hold_the_right_tensors():
    model = dt.wrap(bert_cls(), dt.LoraConfig(
        r=4, targets=["query", "value", "word_embeddings"], modules_to_save=["classifier"], bias="lora_only"))
    optimizer = dt.loraplus_optimizer(model, lr=1e-3, ratio=16, weight_decay=0.01)
    groups = named_groups(optimizer)
    params = dict(model.named_parameters())
    a = {n for n in params if n.endswith(("lora_A.weight", "lora_embedding_A"))}
    b = {n for n in params if n.endswith(("lora_B.weight", "lora_embedding_B"))}
    assert len(a) == len(b) == 5
    assert ids_of(groups["lora_A"]["params"]) == ids_of(params[n] for n in a)
    assert ids_of(groups["lora_B"]["params"]) == ids_of(params[n] for n in b)
    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_B"]["lr"] == 16e-3
    biases = {n for n, p in params.items() if p.requires_grad and p.ndim == 1}
    assert any(".query.bias" in n for n in biases) and any("classifier" in n for n in biases)
    assert ids_of(groups["other_no_decay"]["params"]) == ids_of(params[n] for n in biases)
    assert groups["other_no_decay"]["lr"] == 1e-3 and groups["other_no_decay"]["weight_decay"] == 0
    assert ids_of(groups["other"]["params"]) == {id(params["model.classifier.copies.default.weight"])}
    everything = [p for g in optimizer.param_groups for p in g["params"]]
    assert ids_of(everything) == ids_of(model.trainable_parameters()) and len(everything) == len(set(map(id, everything)))
    with_embedding_lr = named_groups(dt.loraplus_optimizer(model, lr=1e-3, embedding_lr=1e-6))
    assert len(with_embedding_lr["embedding"]["params"]) == 2 and with_embedding_lr["embedding"]["lr"] == 1e-6
    assert len(with_embedding_lr["lora_A"]["params"]) == 4


def test_groups_for_dora_asylora_and_mora():
    model = dt.wrap(bert_cls(), dt.DoraConfig(r=4, targets=["query"]), "dora")
    model.add_adapter("asy", dt.AsyLoraConfig(r=4, targets=["value"]))
    model.add_adapter("mora", dt.MoraConfig(r=4, targets=["key"]))
    model.set_adapter(["dora", "asy", "mora"])
    groups = named_groups(dt.loraplus_optimizer(model, lr=1e-3, ratio=4))
    assert len(groups["lora_A"]["params"]) == 2  # DoRA's A only: AsyLoRA's A is frozen
    assert len(groups["lora_B"]["params"]) == 4 and groups["lora_B"]["lr"] == 4e-3
    assert len(groups["magnitude"]["params"]) == 2 and groups["magnitude"]["weight_decay"] == 0
    assert [tuple(p.shape) for p in groups["other"]["params"]] == [(16, 16)] * 2  # MoRA M: sqrt((32 + 32) * 4) = 16


def test_loraplus_training_step_runs():
    model = dt.wrap(bert_cls(), dt.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    model.train()
    optimizer = dt.loraplus_optimizer(model, lr=1e-2)
    losses = []
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(5):
        loss = model(input_ids=ids(), labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


def train_steps(model, optimizer, relora, steps: int, data, target) -> None:
    for _ in range(steps):
        loss = (model(data) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        relora.step()


def regression():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16, bias=False))
    data = torch.randn(256, 16)
    target = data @ torch.randn(16, 16).T  # a full-rank map: one rank-2 update cannot reach it
    return net, data, target


def test_restart_keeps_function_changes_w0_and_prunes_state():
    net, data, target = regression()
    model = dt.wrap(net, dt.LoraConfig(r=2, targets=["0"]))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    relora = dt.ReLoRA(model, optimizer, every=1000, prune=0.9, warmup=2)
    train_steps(model, optimizer, relora, 10, data, target)
    host = model.model[0]
    delta = host.adapters["default"]
    w_before = host.weight.detach().clone()
    with torch.no_grad():
        before = model(data)
    relora.restart()
    with torch.no_grad():
        assert (model(data) - before).abs().max() <= 1e-5
    assert (host.weight - w_before).abs().max() > 1e-4
    assert torch.count_nonzero(delta.lora_B.weight) == 0 and torch.count_nonzero(delta.lora_A.weight) > 0
    for p in (delta.lora_A.weight, delta.lora_B.weight):
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[p][key]
            assert (state == 0).sum() == int(0.9 * state.numel())  # the 90% smallest magnitudes are zeroed
    full = dt.ReLoRA(model, optimizer, every=1000, reset="full")
    train_steps(model, optimizer, full, 1, data, target)
    full.restart()
    assert all(torch.count_nonzero(optimizer.state[p]["exp_avg"]) == 0 for p in delta.parameters())


def test_jagged_cosine_schedule():
    net, data, target = regression()
    model = dt.wrap(net, dt.LoraConfig(r=2, targets=["0"]))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    relora = dt.ReLoRA(model, optimizer, every=10, warmup=4, initial_warmup=5, total_steps=40, min_lr_ratio=0.1)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(39):
        relora.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1 * 1 / 5 * 1.0)  # first warmup step, cosine at 1
    assert lrs[4] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 40)).item())))
    for restart in (10, 20, 30):
        assert lrs[restart] < 0.3 * lrs[restart - 1]  # the jag: back to a quarter of the warmup
        assert lrs[restart + 3] > lrs[restart + 2] > lrs[restart]
    assert relora.restarts == 3


def test_accumulated_update_exceeds_rank_r():
    net, data, target = regression()
    model = dt.wrap(net, dt.LoraConfig(r=2, alpha=2, targets=["0"]))
    w0 = model.model[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-2)
    relora = dt.ReLoRA(model, optimizer, every=40, warmup=5, prune=0.99)
    train_steps(model, optimizer, relora, 200, data, target)
    assert relora.restarts == 5
    update = model.model[0].weight.detach() - w0
    assert torch.linalg.matrix_rank(update, atol=1e-4).item() > 2 * 3


def test_relora_refuses_non_lora_adapters():
    model = dt.wrap(bert_cls(), dt.DoraConfig(r=2, targets=["query"]))
    with pytest.raises(dt.ConfigError, match="plain LoRA"):
        dt.ReLoRA(model, torch.optim.SGD(model.trainable_parameters(), lr=0.1), every=10)
    assert isinstance(model.model.bert.encoder.layer[0].attention.self.query, DeltaLayer)
