#!/usr/bin/env bash
# Install (idempotent), start a local 3-peer swarm on the embedded model, ask it a question
# through the swarm, and stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/swarmllm swarm --peers 3 --ask "${1:-What is the capital of France?}"
