"""Time and peak memory of ``dt.load`` for a larger adapter: LoRA r=64 on every linear layer of a random Llama
(hidden 1024, FFN 4096, 8 layers; 12.6 M adapter parameters, 50 MB in float32).

One process builds the base once, saves the adapter, then loads it ``--repeats`` times onto the same base (each
loaded adapter is unloaded again) and reports the median wall time. Peak memory is the rise of the process's peak
resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the load) over the resident set
before it: what one load adds at its worst moment, file tensors included. Freed heap memory is handed back to the
system first (glibc ``malloc_trim``), else a load could reuse the previous adapter's memory without the resident
set growing.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_load.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path


def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_base(layers: int, hidden: int, ffn: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=64)
    args = parser.parse_args()
    import torch

    import deltatune as dt

    torch.set_num_threads(args.threads)
    base = build_base(args.layers, 1024, 4096)
    model = dt.wrap(base, dt.LoraConfig(r=args.r, alpha=args.r, targets="all-linear", init="random"))
    adapter_params = sum(p.numel() for p in model.trainable_parameters())
    folder = Path(tempfile.mkdtemp(prefix="bench_load_"))
    model.save(folder)
    base = model.unload()
    times, peaks = [], []
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    for _ in range(args.repeats):
        trim(0)
        before = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        loaded = dt.load(base, folder)
        times.append(time.perf_counter() - start)
        peaks.append((rss_kib("VmHWM") - before) / 1024)
        base = loaded.unload()
        del loaded
    print(f"adapter: {adapter_params / 1e6:.1f} M parameters, file {(folder / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB")
    print(f"load: median {statistics.median(times) * 1e3:.1f} ms over {args.repeats} (all: "
          f"{', '.join(f'{t * 1e3:.0f}' for t in times)} ms)")
    print(f"peak RSS rise during load: median {statistics.median(peaks):.1f} MiB (all: "
          f"{', '.join(f'{p:.0f}' for p in peaks)} MiB)")


if __name__ == "__main__":
    main()
