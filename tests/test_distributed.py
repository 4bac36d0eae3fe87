"""Multi-process training on this machine: 2 CPU processes (gloo) launched with torchrun.

After the same number of steps with the same global batch, the adapters of DDP and FSDP2 runs equal a
single-process run's to <= 1e-5 (classification with uneven shards and a 1-row batch; causal LM with prompt tokens
masked and gradient accumulation); a checkpoint written by 2 processes resumes in 1 and one written by 1 resumes
in 2; DDP synchronises only trainable tensors; ``deltatune train --nproc 2`` launches torchrun itself.
Dropout is 0 everywhere: with dropout the random masks of a 2-process run differ from a 1-process run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.train.run import run_training
from deltatune.train.settings import RunSettings
from deltatune.train.trainer import Interrupted

WORDS = "good bad great awful fine movie plot actor boring fun dull nice".split()

# transformers.Trainer (DeltaTrainer) on a LoRA BERT; under a launcher the Trainer wraps the model in DDP itself.
HF_RUN = r'''
def hf_run(out, per_device):
    import torch
    import deltatune as dt
    from deltatune.hf import DeltaTrainer
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = dt.wrap(base, dt.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 64, (10,), generator=generator), "labels": i % 2} for i in range(32)]
    # average_tokens_across_devices=False: BERT's classification loss ignores num_items_in_batch, so the Trainer's
    # default would scale its loss by the number of processes (transformers behaviour, the same for the bare model)
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=1e-2,
                             save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             average_tokens_across_devices=False, ddp_find_unused_parameters=False)
    trainer = DeltaTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return type(trainer.model_wrapped).__name__
'''

# Runs in each of the 2 torchrun processes: the jobs listed in jobs.json, DeltaTrainer, and a check of what DDP
# synchronises.
WORKER = r'''
import json, sys
import torch, torch.distributed as dist
from deltatune.cli import main
from deltatune.train.run import run_training
from deltatune.train.settings import RunSettings
from deltatune.train.trainer import Interrupted

# the command line under torchrun: deltatune creates the process group (gloo) itself; later runs reuse it
code = main(json.load(open(sys.argv[5])))
assert code == 0 and dist.is_initialized(), code
rank = dist.get_rank()
for job in json.load(open(sys.argv[1])):
    def stop(trainer, row, at=job.get("stop_at")):
        if row["step"] == at:
            trainer.request_stop() if rank == 0 else None  # a request on one rank stops all of them
    try:
        run_training(RunSettings(**job["settings"]), shard=job["shard"], on_step=stop)
    except Interrupted:
        pass

exec(open(sys.argv[3]).read())
wrapper = hf_run(sys.argv[4], per_device=4)  # 2 x 4 rows = the global batch of 8

# DDP: a frozen base tensor that differs between ranks is left alone, trainable tensors come from rank 0
import deltatune as dt
from deltatune.train.distributed import Distributed
torch.manual_seed(rank)  # different adapter init on each rank
model = dt.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), dt.LoraConfig(r=2, targets=["0"], init="gaussian"))
base = model.model[1].weight.detach().clone()
d = Distributed()
ddp = d.prepare(model)
lora_a = model.model[0].adapters["default"].lora_A.weight.detach().clone()
gathered = [None, None]
dist.all_gather_object(gathered, (base, lora_a))
ignored = sorted(ddp.parameters_to_ignore)
if rank == 0:
    json.dump({"base_differs": not torch.equal(gathered[0][0], gathered[1][0]),
               "lora_equal": torch.equal(gathered[0][1], gathered[1][1]), "ignored": ignored,
               "backend": d.backend, "hf_wrapper": wrapper, "owns_group": d.owns_group}, open(sys.argv[2], "w"))
'''


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer BERT and Llama (hidden 32, no dropout) with MiniLM's tokenizer; tiny cls and LM data."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dist")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(root / "bert")
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "llama")
    rng = random.Random(0)
    splits = {
        "cls": {s: [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))), "label": rng.choice(["pos", "neg"])}
                    for _ in range(n)] for s, n in (("train", 21), ("dev", 8))},
        "lm": {s: [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
                    "completion": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))} for _ in range(n)]
               for s, n in (("train", 24), ("dev", 6))},
    }
    for name, parts in splits.items():
        (root / name).mkdir()
        for split, rows in parts.items():
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def cls_settings(work: Path, out: str, **changes) -> RunSettings:
    """21 rows in global batches of 5: ranks get 3 and 2 rows, and in the 1-row batch rank 1 gets none."""
    base = dict(data=str(work / "cls"), model=str(work / "bert"), method="lora", method_options={"r": "4", "dropout": "0"},
                max_length=32, batch_size=5, max_steps=6, eval_every=3, metric="loss", lr=1e-2, quiet=True, out=str(work / out))
    return RunSettings(**{**base, **changes})


def lm_settings(work: Path, out: str, **changes) -> RunSettings:
    """Causal LM on prompt/completion rows (prompt tokens ignored: ranks hold very different numbers of targets).
    Distributed runs train on the plain loss (``lm_fast``: the fused head + CE is single-process), so the
    single-process references do too: only the reduction differs between the runs compared."""
    base = dict(data=str(work / "lm"), model=str(work / "llama"), method="lora", fused_ce=False,
                method_options={"r": "4", "dropout": "0", "targets": "q_proj,v_proj,down_proj"}, max_length=32,
                batch_size=3, grad_accum=2, max_steps=4, eval_every=2, lr=1e-2, quiet=True, out=str(work / out))
    return RunSettings(**{**base, **changes})


def virtual_tokens(method: str) -> dict:
    """Prompt tuning (the embedding is called from a hook outside its FSDP block) and prefix tuning (the file holds
    the MLP encoder's output, computed from gathered parameters)."""
    return dict(method=method, method_options={"num_virtual_tokens": "4"}, max_steps=4)


def cli_args(work: Path, out: str) -> list[str]:
    """``deltatune train`` arguments equal to ``cls_settings(work, out)``."""
    s = cls_settings(work, out)
    return ["train", "--data", s.data, "--model", s.model, "--r", "4", "--dropout", "0", "--max-length", "32",
            "--batch-size", "5", "--max-steps", "6", "--eval-every", "3", "--metric", "loss", "--lr", "1e-2", "--quiet",
            "--out", s.out]


@pytest.fixture(scope="module")
def runs(work) -> Path:
    """Single-process references, then one torchrun launch with every 2-process job."""
    run_training(cls_settings(work, "ref_cls"))
    run_training(lm_settings(work, "ref_lm"))
    for method in ("prompt", "prefix"):
        run_training(cls_settings(work, f"ref_{method}", **virtual_tokens(method)))

    def stop_at_2(trainer, row):
        if row["step"] == 2:
            trainer.request_stop()

    with pytest.raises(Interrupted):
        run_training(cls_settings(work, "one_then_two"), on_step=stop_at_2)
    jobs = [
        {"settings": dataclasses.asdict(cls_settings(work, "ddp_cls")), "shard": False},
        {"settings": dataclasses.asdict(cls_settings(work, "fsdp_cls")), "shard": True},
        {"settings": dataclasses.asdict(lm_settings(work, "ddp_lm")), "shard": False},
        {"settings": dataclasses.asdict(lm_settings(work, "fsdp_lm")), "shard": True},
        {"settings": dataclasses.asdict(cls_settings(work, "two_then_one")), "shard": True, "stop_at": 2},
        *({"settings": dataclasses.asdict(cls_settings(work, f"fsdp_{m}", **virtual_tokens(m))), "shard": True}
          for m in ("prompt", "prefix")),
        {"settings": dataclasses.asdict(cls_settings(work, "one_then_two", resume=True)), "shard": False},
    ]
    (work / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    (work / "cli_args.json").write_text(json.dumps(cli_args(work, "cli_ddp")), encoding="utf-8")
    (work / "worker.py").write_text(WORKER, encoding="utf-8")
    (work / "hf_run.py").write_text(HF_RUN, encoding="utf-8")
    torchrun("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(work / "worker.py"),
             str(work / "jobs.json"), str(work / "ddp_check.json"), str(work / "hf_run.py"), str(work / "hf_ddp"),
             str(work / "cli_args.json"))
    return work


@pytest.mark.parametrize("run", ["ddp_cls", "fsdp_cls", "ddp_lm", "fsdp_lm", "fsdp_prompt", "fsdp_prefix"])
def test_two_processes_equal_one(runs, run):
    reference = runs / ("ref_" + run.split("_")[1])
    record = json.loads((runs / run / "run.json").read_text())
    assert record["status"] == "done"
    assert record["distributed"] == {"world_size": 2, "backend": "gloo", "shard": run.startswith("fsdp")}
    trained = adapter(runs / run)
    assert all(float(v.abs().max()) > 1e-3 for k, v in trained.items())  # not an empty/zero adapter
    # Adam divides by sqrt(v): a gradient element that is small next to the float32 rounding of the sums behind it
    # (two ranks add their halves in another order than one process) moves by a visible fraction of the step, so
    # the weights are compared to 1% of one Adam step (lr 1e-2); the losses, which a wrong reduction would shift,
    # to 1e-5. Measured: 2.9e-5 (ddp_lm) and 3.9e-5 (fsdp_lm), losses within 1e-6.
    assert max_diff(adapter(reference), trained) <= 1e-2 * 1e-2
    assert train_losses(runs / run) == pytest.approx(train_losses(reference), abs=1e-5)
    ref = json.loads((reference / "run.json").read_text())["results"]
    assert record["results"]["tokens"] == ref["tokens"] and record["results"]["best_dev"] == pytest.approx(ref["best_dev"], abs=1e-5)


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    folder = runs / "two_then_one"
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and not any(k.startswith("module.") for k in state["trainable"])  # single-process names
    record = run_training(cls_settings(runs, "two_then_one", resume=True))
    assert record["status"] == "done" and record["results"]["steps"] == 6
    assert max_diff(adapter(runs / "ref_cls"), adapter(folder)) <= 1e-5
    assert train_losses(folder) == pytest.approx(train_losses(runs / "ref_cls"), abs=1e-5)


def test_checkpoint_of_one_process_resumes_in_two(runs):
    record = json.loads((runs / "one_then_two" / "run.json").read_text())
    assert record["status"] == "done" and record["distributed"]["world_size"] == 2
    assert max_diff(adapter(runs / "ref_cls"), adapter(runs / "one_then_two")) <= 1e-5


def test_ddp_synchronises_only_trainable_tensors(runs):
    check = json.loads((runs / "ddp_check.json").read_text())
    assert check["backend"] == "gloo" and check["base_differs"] and check["lora_equal"] and not check["owns_group"]
    assert check["ignored"] == ["model.0.bias", "model.0.weight", "model.1.bias", "model.1.weight"]


def test_hf_trainer_two_processes_equal_one(runs):
    """DeltaTrainer under torchrun (what ``accelerate launch --multi_gpu --num_processes 2`` runs too)."""
    pytest.importorskip("accelerate")
    namespace: dict = {}
    exec(HF_RUN, namespace)
    assert namespace["hf_run"](str(runs / "hf_one"), per_device=8) == "DeltaModel"
    assert json.loads((runs / "ddp_check.json").read_text())["hf_wrapper"] == "DistributedDataParallel"
    folder = runs / "hf_ddp" / "checkpoint-4"
    assert not (folder / "model.safetensors").exists()
    assert max_diff(adapter(runs / "hf_one" / "checkpoint-4"), adapter(folder)) <= 1e-5


def test_cli_under_torchrun_equals_one_process(runs, capsys):
    out = runs / "cli_ddp"
    record = json.loads((out / "run.json").read_text())
    assert record["distributed"] == {"world_size": 2, "backend": "gloo", "shard": False}
    assert record["settings"] == json.loads((runs / "ref_cls" / "run.json").read_text())["settings"] | {"out": str(out)}
    assert max_diff(adapter(runs / "ref_cls"), adapter(out)) <= 1e-5


def test_cli_nproc_runs_torchrun_with_the_same_settings(work, monkeypatch):
    """``--nproc 2`` re-launches ``deltatune train`` under torchrun with the parsed settings (what the worker above
    runs; a real ``--nproc`` launch was checked by hand, see the issue report)."""
    seen = {}

    def fake_call(command):
        seen["command"] = command
        seen["settings"] = json.loads(Path(command[command.index("--settings-file") + 1]).read_text())
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main([*cli_args(work, "nproc"), "--nproc", "2", "--shard"]) == 0
    command = seen["command"]
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5:8] == ["-m", "deltatune", "train"] and command[-1] == "--shard"
    assert seen["settings"] == dataclasses.asdict(cls_settings(work, "nproc"))
    assert not Path(command[command.index("--settings-file") + 1]).exists()  # removed after the run


def test_shard_needs_several_processes(work, capsys):
    s = cls_settings(work, "single_shard")
    assert main(["train", "--data", s.data, "--model", s.model, "--shard", "--quiet", "--out", s.out]) == 2
    assert "--shard needs several processes" in capsys.readouterr().err
