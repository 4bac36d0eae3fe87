"""Resident memory of the default causal-LM LoRA step on SmolLM2 (GSM8K batches of 4 x up to 512), step by step:
after import, after building the model, after each step (current and peak RSS). Shows how much of the peak is the
allocator keeping freed memory: compare a run with glibc's dynamic mmap threshold fixed,

    .venv/bin/python benchmarks/rss_llm_step.py 1 2        # checkpoint every block (0: none, k: every k-th), 2 steps
    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python benchmarks/rss_llm_step.py 1 2
    .venv/bin/python benchmarks/rss_llm_step.py 2 3 mmap   # the same set in process (mallopt), every 2nd block

glibc serves large blocks by mmap (given back on free) but raises that threshold each time such a block is freed,
up to 32 MB: after the first backward, activations below it come from the heap, and freed heap memory stays
resident. Per step: wall and process CPU seconds, current and peak RSS.
"""
import argparse
import ctypes
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss() -> str:
    cur = int(open("/proc/self/statm").read().split()[1]) * 4096
    return f"cur {cur/1e9:.2f} GB max {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024/1e9:.2f} GB"


print("import", rss(), flush=True)
from profile_llm_step import build  # noqa: E402

from deltatune.train.lm_fast import enable_checkpointing, loss_function  # noqa: E402
from deltatune.train.models import unwrap_hf  # noqa: E402

every = int(sys.argv[1])
if len(sys.argv) > 3 and sys.argv[3] == "mmap":  # glibc: mallopt(M_MMAP_THRESHOLD, 1 MiB), fixed from now on
    print("mmap threshold fixed:", bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)), flush=True)
args = argparse.Namespace(batch=4, max_length=512, threads=1, steps=4)
model, plain, batches, opt = build(args, "before", batches=4)
print("built", rss(), flush=True)
if every:
    enable_checkpointing(unwrap_hf(model), every)
fused = loss_function(model, unwrap_hf(model), "causal-lm", True, False)
for b in batches[:int(sys.argv[2])]:
    t, c = time.perf_counter(), time.process_time()
    loss = fused(b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(list(b["input_ids"].shape), f"{time.perf_counter()-t:.1f} s", f"cpu {time.process_time()-c:.1f} s", rss(), flush=True)
