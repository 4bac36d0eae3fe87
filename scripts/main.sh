#!/usr/bin/env bash
# Set up, then run the main job: full fine-tuning vs head-only vs last-2-layers vs LoRA on SST-2 with the bundled
# MiniLM (same data, budget and seed), printing the comparison table. Extra arguments go to `deltatune compare`
# (e.g. --max-train 1000 for a quicker look). Re-running reuses finished runs and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/deltatune compare --data ../shared/data/sst2 \
  --methods full,head,last-layers,lora --max-train 4000 --out runs/main "$@"
