"""transformers.Trainer with a DeltaModel: checkpoints hold adapter files (not the model), resume is exact, and
gradient checkpointing behind a frozen embedding still trains the adapters (the PEFT #137 trap)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import deltatune as dt
from deltatune.errors import ConfigError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from deltatune.hf import DeltaTrainer, enable_input_require_grads  # noqa: E402


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def dataset(n: int = 24) -> list[dict[str, torch.Tensor]]:
    """Labels depend on the tokens (label = whether token 5 occurs), so there is something to learn."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(6, 64, (10,), generator=generator)
        if torch.rand((), generator=generator) < 0.5:
            ids[int(torch.randint(1, 10, (), generator=generator))] = 5
        rows.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": int((ids == 5).any())})
    return rows


def make_trainer(out, max_steps: int = 4, **args) -> DeltaTrainer:
    from transformers import TrainingArguments

    model = dt.wrap(tiny_bert(), dt.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]))
    arguments = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, **args,
    )
    return DeltaTrainer(model=model, args=arguments, train_dataset=dataset())


def live_adapter(model: dt.DeltaModel) -> dict[str, torch.Tensor]:
    from deltatune.io import adapter_tensors

    return {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}


def test_trainer_checkpoints_hold_adapter_files_not_the_model(tmp_path):
    trainer = make_trainer(tmp_path / "out")
    before = live_adapter(trainer.model)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for step in (2, 4):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-4" / "adapter_model.safetensors"))
    after = live_adapter(trainer.model)
    assert {k[len("base_model.model."):] for k in saved} == set(after)
    for key, value in after.items():
        assert torch.equal(saved["base_model.model." + key], value)
    assert any(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k)  # the adapters trained
    # the checkpoint is a normal adapter folder: a fresh base + dt.load computes what the trained model computes
    batch = {k: torch.stack([r[k] for r in dataset()[:4]]) for k in ("input_ids", "attention_mask")}
    trainer.model.eval()
    reloaded = dt.load(tiny_bert().eval(), str(tmp_path / "out" / "checkpoint-4"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits, rtol=0, atol=1e-6)


def test_resume_from_trainer_checkpoint_is_exact(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.train()
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    first = make_trainer(tmp_path / "b")  # same 4-step schedule, stopped after the step-2 checkpoint
    first.add_callback(StopAt2())
    first.train()
    assert first.state.global_step == 2
    resumed = make_trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    a, b = live_adapter(straight.model), live_adapter(resumed.model)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_trainer_gradient_checkpointing_reentrant_matches_plain(tmp_path):
    plain = make_trainer(tmp_path / "a", max_steps=2)
    plain.train()
    checkpointed = make_trainer(tmp_path / "b", max_steps=2, gradient_checkpointing=True,
                                gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed.train()
    a, b = live_adapter(plain.model), live_adapter(checkpointed.model)
    layer0 = [k for k in a if "layer.0." in k and "lora_B" in k]
    assert layer0 and all(float(b[k].abs().max()) > 0 for k in layer0)  # block 0 (behind the frozen embedding) trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


class Checkpointed(nn.Module):
    """Frozen embedding -> re-entrant checkpointed block (LoRA goes here) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.use_checkpoint = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        if self.use_checkpoint:
            hidden = checkpoint(self.block, hidden, use_reentrant=True)
        else:
            hidden = self.block(hidden)
        return self.head(torch.tanh(hidden)).mean(1)


def lora_grads(model: dt.DeltaModel, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(ids).pow(2).sum().backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if "lora" in n}


def test_input_require_grads_fixes_the_frozen_embedding_trap():
    torch.manual_seed(0)
    model = dt.wrap(Checkpointed(), dt.LoraConfig(r=2, targets=["block"], init="gaussian", modules_to_save=["head"]))
    with torch.no_grad():
        model.model.block.adapters["default"].lora_B.weight.normal_()
    ids = torch.randint(0, 20, (3, 5))
    model.model.use_checkpoint = False
    reference = lora_grads(model, ids)
    model.model.use_checkpoint = True
    with pytest.warns(UserWarning, match="requires_grad"):
        trapped = lora_grads(model, ids)
    assert all(g is None for g in trapped.values())  # silently untrained adapters: the trap
    enable_input_require_grads(model)
    enable_input_require_grads(model)  # idempotent
    fixed = lora_grads(model, ids)
    for name, grad in reference.items():
        assert grad is not None and float(grad.abs().max()) > 0
        torch.testing.assert_close(fixed[name], grad, rtol=0, atol=1e-6)


def test_delta_trainer_needs_a_delta_model(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ConfigError, match="DeltaModel"):
        DeltaTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_default_arguments_evaluate_with_eval_loss_and_load_the_best_adapter(tmp_path):
    """Trainer finds ``labels`` through the base model (PEFT's model gets ['labels'] too), so evaluate() reports
    eval_loss and load_best_model_at_end works with the default metric_for_best_model ("loss")."""
    from transformers import TrainingArguments

    model = dt.wrap(tiny_bert(), dt.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]))
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
        eval_steps=2, eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = DeltaTrainer(model=model, args=arguments, train_dataset=dataset(), eval_dataset=dataset(8))
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    rows = [dataset(8)[i] for i in range(8)]
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
    with torch.no_grad():
        model.eval()
        expected = model(**batch).loss.item()
    assert abs(metrics["eval_loss"] - expected) <= 1e-5
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith(("checkpoint-2", "checkpoint-4"))
