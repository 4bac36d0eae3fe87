#!/usr/bin/env bash
# Set up, then run the main job: a side-by-side comparison of methods on real data with the bundled MiniLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python examples/quickstart.py "$@"
