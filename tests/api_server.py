"""Start ``swarmllm api`` as a user would, in a child process, and wait until it serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx

from swarmllm.swarm import HOST, free_port

START_TIMEOUT = 180.0


@contextmanager
def api_server(
    initial_peers: Sequence[str], log_path: Path, *args: str, healthy: bool = True
) -> Iterator[str]:
    """The server's base URL while it runs; with ``healthy`` once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "swarmllm.cli", "api", "--initial-peers", *initial_peers]
    command += ["--host", HOST, "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base = f"http://{HOST}:{port}"
    try:
        wait_until_serving(base, process, log_path, 200 if healthy else None)
        yield base
    finally:
        stop(process)


def wait_until_serving(
    base: str, process: subprocess.Popen, log_path: Path, status: int | None = 200
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text(errors='replace')}")
        try:
            answer = httpx.get(f"{base}/health", timeout=10)
            if status is None or answer.status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} did not serve in {START_TIMEOUT} s: {log_path.read_text()}")


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)
