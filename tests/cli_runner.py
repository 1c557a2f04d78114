"""Run the ``swarmllm`` command as a user would, in a child process of this interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(
    *args: str, timeout: float = 120, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """``swarmllm *args``, bounded by ``timeout`` seconds, its output captured as text;
    ``input`` is its stdin (default: none)."""
    return subprocess.run(
        [sys.executable, "-m", "swarmllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
