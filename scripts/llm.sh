#!/usr/bin/env bash
# Set up, then run the LLM comparison: LoRA, DoRA, prefix tuning and prompt tuning on GSM8K with the bundled
# SmolLM2-135M-Instruct (same rows, steps and seed; chat template; loss on the answers only), printing the table of
# held-out completion loss, trainable parameters, time and memory. Extra arguments go to `deltatune compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/deltatune compare --model smollm2 --data ../shared/data/gsm8k \
  --task causal-lm --prompt-field question --completion-field answer --chat-template \
  --methods lora,dora,prefix,prompt --max-train 200 --max-eval 40 --max-length 256 --batch-size 4 --max-steps 25 \
  --out runs/llm "$@"
