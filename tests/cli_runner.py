"""Run the ``swarmllm`` command as a user would, in a child process of this interpreter."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``swarmllm *args``, bounded by ``timeout`` seconds, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "swarmllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
