#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: unit tests and real local swarms.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
