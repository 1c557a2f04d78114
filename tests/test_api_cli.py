"""``swarmllm swarm --api-port``: the API in front of a local swarm, and a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from api_server import stop, wait_until_serving

from swarmllm.swarm import HOST, free_port

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    """Running (not a zombie nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_swarm_with_api_port_serves_and_sigterm_stops_every_process(tmp_path):
    port = free_port()
    log = tmp_path / "swarm.log"
    command = [sys.executable, "-m", "swarmllm.cli", "swarm", "--peers", "1"]
    command += ["--workdir", str(tmp_path / "work"), "--api-port", str(port), "--host", HOST]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    pids: list[int] = []
    try:
        base = f"http://{HOST}:{port}"
        wait_until_serving(base, process, log)
        pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", log.read_text())]
        assert len(pids) == 1 and _alive(pids[0])
        answer = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 12,
            },
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]

        assert stop(process) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 15
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, pids)), "the peers outlived the stopped swarm"
        assert "swarm stopped" in log.read_text()
    finally:
        stop(process)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
