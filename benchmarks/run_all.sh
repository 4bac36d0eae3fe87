#!/usr/bin/env bash
# Run the speed/memory benchmark suite; results land in benchmarks/results/*.json (summarised in docs/BENCHMARKS.md).
#   bash benchmarks/run_all.sh            # small sizes (MiniLM 8x128, Llama-20M 4x128): ~20 min on 2 free cores
#   bash benchmarks/run_all.sh --full     # issue sizes: MiniLM 32x128; random Llama ~20M and ~100M at 8x256
# --full (about 1.5-2 h on 2 free cores, much longer on a loaded machine), THREADS torch threads per process:
#   MiniLM: floor, full FT, LoRA r8 all-linear and q,v at dropout 0.1 and 0, LoRA r16 all-linear dropout 0.1,
#           DoRA r8 all-linear (deltatune and PEFT each), 2 alternated rounds x 10 timed steps;
#           floor / LoRA d0.1, d0 / PEFT d0.1 paired step by step in one process (16 rounds); the time cost of
#           rebuilding FFN inputs in backward (paired, 10 rounds);
#           then a torch.profiler breakdown (floor, LoRA d0.1/d0, DoRA);
#   Llama-20M 8x256: floor, full FT, LoRA r8 all-linear dropout 0.1 and 0 (deltatune and PEFT), 2 rounds x 10 steps;
#   Llama-100M 8x256: floor, deltatune and PEFT LoRA r8 all-linear dropout 0.1, deltatune dropout 0, 1 round x 3
#           steps (~10 s of CPU per step: 10 steps x 2 rounds would be ~1 h alone);
#   inference: base / unmerged / merged / PEFT at 32x128, 8x128, 1x16.
# (DoRA vs PEFT DoRA is in the MiniLM training-step set.)
# THREADS=2 (default 1) sets torch threads per process: 2 is the issue's setting (wall time on an idle machine),
# 1 keeps CPU-time ratios meaningful when other jobs share the machine.
# Set SUITE_SKIP="llama100m inference" (any of minilm paired rebuild profile llama20m llama100m inference) to leave parts out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=benchmarks/results
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SKIP=" ${SUITE_SKIP:-} "
T="--threads ${THREADS:-1}"
run() { [[ "$SKIP" == *" $1 "* ]] && { echo "skip $1"; return; }; shift; echo "+ $*"; "$@"; }
echo "load average at start: $(cat /proc/loadavg)"
if [[ "${1:-}" == "--full" ]]; then
  run minilm $PY benchmarks/bench_train_step.py --full --models minilm --rounds 2 --steps 10 --warmup 2 $T \
    --variants floor,full,dt-lora-r8-all-d0.1,peft-lora-r8-all-d0.1,dt-lora-r8-all-d0,peft-lora-r8-all-d0,dt-lora-r8-qv-d0.1,peft-lora-r8-qv-d0.1,dt-lora-r8-qv-d0,peft-lora-r8-qv-d0,dt-lora-r16-all-d0.1,peft-lora-r16-all-d0.1,dt-dora-r8-all-d0,peft-dora-r8-all-d0 \
    --out $R/bench_train_step_minilm.json --no-profile
  run paired $PY benchmarks/bench_paired_step.py --rounds 16 $T \
    --variants floor,dt-lora-r8-all-d0.1,dt-lora-r8-all-d0,peft-lora-r8-all-d0.1 --out $R/bench_paired_step.json
  run rebuild $PY benchmarks/bench_rebuild_cost.py --rounds 10 $T --out $R/bench_rebuild_cost.json
  run profile $PY benchmarks/bench_train_step.py --full --models minilm --profile-only $T \
    --variants floor,dt-lora-r8-all-d0.1,dt-lora-r8-all-d0,dt-dora-r8-all-d0 --out $R/bench_train_step_profile.json
  run llama20m $PY benchmarks/bench_train_step.py --full --models llama20m --rounds 2 --steps 10 --warmup 2 $T \
    --out $R/bench_train_step_llama20m.json
  # (in the session of 2026-11-22 this ran with --steps 2 and without the PEFT row, for time)
  run llama100m $PY benchmarks/bench_train_step.py --full --models llama100m --rounds 1 --steps 3 --warmup 1 $T \
    --variants floor,dt-lora-r8-all-d0.1,peft-lora-r8-all-d0.1,dt-lora-r8-all-d0 --out $R/bench_train_step_llama100m.json
  run inference $PY benchmarks/bench_inference.py --shapes 32x128,8x128,1x16 --iters 30 $T
else
  run minilm $PY benchmarks/bench_train_step.py --models minilm,llama20m $T --out $R/bench_train_step.json
  run inference $PY benchmarks/bench_inference.py $T
fi
echo "load average at end: $(cat /proc/loadavg)"
