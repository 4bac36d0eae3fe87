#!/usr/bin/env bash
# Set up, then compare fine-tuning methods on GSM8K with the bundled SmolLM2-135M-Instruct: the base model's row
# first, then full fine-tuning, LoRA, DoRA, MoRA, AsyLoRA, prompt tuning, prefix tuning, P-tuning v2, Houlsby
# adapters and QLoRA, each judged by held-out completion loss, exact match of greedy answers and forgetting (the rise
# in loss on IMDb review text). The default budget is small enough for a 2-core CPU (see README: how long it took);
# extra arguments go to `deltatune compare` (e.g. --max-train 400 --max-eval 50 --em-rows 50 for a closer look).
# Re-running reuses finished runs and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/deltatune compare --model smollm2 --data ../shared/data/gsm8k \
  --task causal-lm --prompt-field question --completion-field answer \
  --methods full,lora,dora,mora,asylora,prompt,prefix,ptuning-v2,houlsby,qlora \
  --max-train 32 --batch-size 4 --epochs 1 --max-length 256 --max-eval 16 --eval-batch-size 16 \
  --em-rows 16 --max-new-tokens 160 --forgetting-data ../shared/data/imdb --forgetting-rows 8 --threads 1 \
  --out runs/llm-compare "$@"
