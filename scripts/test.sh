#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: unit tests and real local swarms.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The browser tests drive Debian's Chromium (never a downloaded one); install it when missing.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: chromium is missing and cannot be installed here (needs root and" \
            "apt-get); the browser tests will fail until it is: apt-get install chromium" >&2
    fi
fi
exec .venv/bin/python -m pytest "$@"
