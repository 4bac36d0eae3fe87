"""The causal-LM fast path equals the plain path: fused chunked head + cross-entropy (loss and gradients, LoRA and
full fine-tuning with tied embeddings), activation checkpointing on/off, and the trainer's first steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.train.fused_ce import causal_lm_loss, linear_cross_entropy
from deltatune.train.lm_fast import captured_hidden, enable_checkpointing, fused_blocker, fused_causal_lm_loss

transformers = pytest.importorskip("transformers")

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("eager", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(eager: bool, bias: bool, chunk: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (20,))
    loss = linear_cross_entropy(h, w, b, y, chunk=chunk, eager=eager)
    (loss * 2.5).backward()
    got = [t.grad.clone() for t in (h, w, b) if t is not None]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    ref = F.cross_entropy(F.linear(h, w, b), y)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss, ref)
    for mine, theirs in zip(got, [t.grad for t in (h, w, b) if t is not None]):
        torch.testing.assert_close(mine, theirs)


def test_frozen_head_gets_no_gradient_and_ignored_positions_skip_the_head() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 6))
    labels[0, :4] = -100
    labels[1, -1] = -100
    loss = causal_lm_loss(hidden, labels, w, chunk=2)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_hidden @ w.T
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **TOL)
    assert hidden.grad[0, :3].abs().sum() == 0  # their shifted labels are -100: no head, no gradient


def tiny_llama(seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).float()


def batch(seed: int = 2, rows: int = 3, width: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (rows, width), generator=g)
    lengths = [width, width - 4, width - 7][:rows]
    mask = torch.zeros(rows, width, dtype=torch.long)
    labels = ids.clone()
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        labels[r, n:] = -100
        labels[r, : n // 2] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, hf, data, fused: bool, seed: int = 7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fused_causal_lm_loss(model, hf, data) if fused else model(**data).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(a, b, tol=TOL) -> None:
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_loss_equals_plain_loss_for_lora(dropout: float) -> None:
    hf = tiny_llama()
    model = dt.wrap(hf, dt.LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    model.train()
    data = batch()
    _assert_same(_loss_and_grads(model, hf, data, True), _loss_and_grads(model, hf, data, False))


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_plain_loss_for_full_fine_tuning(tie: bool) -> None:
    hf = tiny_llama(tie=tie)
    hf.train()
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    data = batch()
    fused, plain = _loss_and_grads(hf, hf, data, True), _loss_and_grads(hf, hf, data, False)
    _assert_same(fused, plain)
    assert "lm_head.weight" in plain[1] or tie


def test_capture_restores_the_head_and_blocks_unusable_heads() -> None:
    hf = tiny_llama()
    head = hf.lm_head
    with captured_hidden(hf):
        assert hf.lm_head is not head
    assert hf.lm_head is head and hf.get_output_embeddings() is head
    assert fused_blocker(hf) is None
    hf.config.final_logit_softcapping = 30.0
    assert "softcapping" in fused_blocker(hf)
    adapted = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["lm_head"]))
    assert "not a plain Linear" in fused_blocker(adapted.model)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_same_losses_and_gradients(every: int, dropout: float) -> None:
    data = batch()
    results = []
    for checkpoint in (False, True):
        hf = tiny_llama()
        model = dt.wrap(hf, dt.LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
        model.train()
        if checkpoint:
            assert enable_checkpointing(hf, every) == (3 if every == 1 else 2)
        results.append(_loss_and_grads(model, hf, data, True))
    _assert_same(*results)
