#!/usr/bin/env bash
# Run the speed/memory benchmark suite; results land in benchmarks/results/*.json (summarised in docs/BENCHMARKS.md).
#   bash benchmarks/run_all.sh            # small defaults (~15-20 min on 2 shared cores)
#   bash benchmarks/run_all.sh --full     # issue sizes: MiniLM 32x128, random Llama 20M and 100M at 8x256 (hours here)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "load average at start: $(cat /proc/loadavg)"
if [[ "${1:-}" == "--full" ]]; then
  $PY benchmarks/bench_train_step.py --full --rounds 3
  $PY benchmarks/bench_inference.py --shapes 32x128,8x128,1x16 --iters 30
else
  $PY benchmarks/bench_train_step.py
  $PY benchmarks/bench_inference.py
fi
echo "load average at end: $(cat /proc/loadavg)"
