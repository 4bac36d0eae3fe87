#!/usr/bin/env bash
# Drift check: run ruff and the whole suite in a throwaway venv holding the newest releases on the registry today
# (torch stays the CPU wheel 2.13.0), so an upstream release that breaks us is seen before users hit it.
# VENV=DIR keeps the venv somewhere else (default: a temp folder, removed at the end). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${VENV:+1}
VENV=${VENV:-$(mktemp -d)/venv}
bash scripts/fresh-venv.sh "$VENV"
"$VENV/bin/ruff" check .
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest "$@"
[ -n "$KEEP" ] || rm -rf "$(dirname "$VENV")"
