"""The command line without surprises: one-line errors naming the real cause with meaningful
exit codes, ports in use refused, ``status`` honest about dead peers, ``swarm --workdir``
reusable, logs kept, progress reported, and the usual conveniences."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import run_cli

from swarmllm import __version__
from swarmllm.blocks.sources import ModelSource
from swarmllm.client.bans import UNREACHABLE, BanList
from swarmllm.commands.arguments import image_file
from swarmllm.swarm import LocalSwarm, free_port

DEAD = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD7ayW8p8Y1L9vxvLWK3mzY3KFNSt7qzQhdH6YAAKbR5C"


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_version_and_python_dash_m():
    result = run_cli("--version")  # run_cli runs ``python -m swarmllm``
    assert result.returncode == 0 and result.stdout.strip() == f"swarmllm {__version__}"


def test_help_shows_the_defaults():
    generate = run_cli("generate", "--help").stdout
    assert "tokens per answer (default: 64)" in generate
    assert "--temperature, --top-k or --top-p" in " ".join(generate.split())  # the rule
    assert "(default: 256)" in run_cli("chat", "--help").stdout
    dht = " ".join(run_cli("dht", "--help").stdout.split())
    assert "default: /ip4/127.0.0.1/tcp/31337, this machine only" in dht
    assert "(default: 3)" in run_cli("swarm", "--help").stdout


@pytest.mark.parametrize(
    ("args", "code", "complaint"),
    [
        (["generate", "--max-new-tokens", "x", "hi"], 2, "expected a positive integer, got 'x'"),
        (["generate", "--initial-peers", "garbage"], 2, "invalid multiaddr 'garbage'"),
        (["generate", "--initial-peers", DEAD.split("/p2p/")[0], "hi"], 2, "lacks /p2p/<peer id>"),
        (["chat", "--initial-peers", "/ip4/127.0.0.1/tcp/5"], 2, "lacks /p2p/<peer id>"),
        (["status", "--initial-peers", "/ip4/127.0.0.1/tcp/5"], 2, "lacks /p2p/<peer id>"),
        (["peer", "--initial-peers", "/ip4/127.0.0.1/tcp/5"], 2, "lacks /p2p/<peer id>"),
        (["generate", "--initial-peers", DEAD], 2, "no prompt given"),
        (["generate", "--initial-peers", DEAD, "hi"], 3, "could not join the swarm"),
        (["generate", "--image", "nowhere.png", "--initial-peers", DEAD, "hi"], 2, "nowhere.png"),
        (["bogus-command"], 2, "invalid choice: 'bogus-command'"),
    ],
)
def test_a_mistake_is_one_line_naming_it_with_a_meaningful_exit_code(args, code, complaint):
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert complaint in one_line(result)
    assert "usage:" not in result.stderr


def test_shipped_example_pictures_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("green_star.png", "green_star"):
        path = image_file(name)
        assert path.is_file() and path.is_absolute()


def test_routing_names_unreachable_peers_as_such_not_banned():
    bans = BanList()
    bans.ban("GONE", UNREACHABLE)
    bans.ban("LIAR", "bad signature")
    assert bans.rejections() == {"GONE": "unreachable", "LIAR": "banned"}


def test_num_blocks_beyond_the_model_is_refused(llama):
    result = run_cli("peer", "--model", str(llama.path), "--num-blocks", "40")
    assert result.returncode == 2
    expected = "error: --num-blocks 40 exceeds the model's 6 blocks (serve at most 6)"
    assert one_line(result) == expected


def test_a_port_in_use_is_refused_by_dht_and_peer(llama, tmp_path):
    port = free_port()
    maddr = f"/ip4/127.0.0.1/tcp/{port}"
    first = subprocess.Popen(
        [sys.executable, "-m", "swarmllm", "dht", "--host-maddrs", maddr],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = iter(first.stdout.readline, "")
        assert any("DHT node is up" in line for line in lines)
        address = next(lines).split()[-1]
        for command in (
            ["dht", "--host-maddrs", maddr],
            ["peer", "--model", str(llama.path), "--initial-peers", address]
            + ["--host-maddrs", maddr],
        ):
            result = run_cli(*command)
            assert result.returncode == 3, result.stderr
            assert one_line(result) == (
                f"error: {maddr}: TCP port {port} is already in use by another process; "
                "choose another port (or /tcp/0 for any free one)"
            )
        assert first.poll() is None  # the first node keeps serving
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


@pytest.fixture(scope="module")
def swarm(llama: ModelSource, tmp_path_factory) -> Iterator[tuple[LocalSwarm, list[set[str]]]]:
    # records live 3 refresh periods: long enough to outlast a peer killed during the tests
    workdir = tmp_path_factory.mktemp("swarm")
    refresh = ["--refresh-period", "100"]
    with LocalSwarm(2, source=llama, workdir=workdir, peer_args=refresh) as running:
        progress: list[set[str]] = []
        running.wait_until_ready(timeout=180, on_progress=progress.append)
        yield running, progress


def test_waiting_for_a_swarm_reports_progress_as_peers_come_online(swarm):
    running, progress = swarm
    assert len(progress) >= 2  # called while the peers loaded, not only at the end
    assert progress[-1] == {peer.peer_id for peer in running.peers}
    assert all(a <= b for a, b in itertools.pairwise(progress))


def test_status_shows_a_dead_peer_as_unreachable_and_exits_4(swarm, llama):
    running, _ = swarm
    status = ["status", "--model", str(llama.path), "--initial-peers", *running.initial_peers]
    healthy = run_cli(*status)
    assert healthy.returncode == 0 and "fully covered" in healthy.stdout
    victim = running.peers[-1]
    victim.send_signal(signal.SIGKILL)  # its DHT record outlives it until it expires
    victim.process.wait(timeout=30)
    result = run_cli(*status, "--json")
    assert result.returncode == 4, result.stderr
    report = json.loads(result.stdout)
    states = {row["peer_id"]: row["state"] for row in report["peers"]}
    assert states[victim.peer_id] == "UNREACHABLE"
    assert states[running.peers[0].peer_id] == "ONLINE"
    assert report["uncovered"] == [list(victim.blocks)] and not report["fully_covered"]

    generate = run_cli(
        "generate", "--model", str(llama.path), "--initial-peers", *running.initial_peers, "hi"
    )
    assert generate.returncode == 4
    message = one_line(generate)
    assert "1 peer unreachable" in message and "banned" not in message, message


def _swarm_until_ctrl_c(args: list[str]) -> tuple[str, list[str]]:
    """Run ``swarmllm swarm *args`` until it is ready, Ctrl-C it; its output and peer ids."""
    process = subprocess.Popen(
        [sys.executable, "-m", "swarmllm", "swarm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any("swarm ready" in line for line in lines), "".join(lines)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest
        output = "".join(lines) + rest
        return output, [line.split()[-1] for line in lines if "--initial-peers" in line]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_swarm_keeps_its_logs_and_reuses_its_workdir(llama):
    base = ["--peers", "2", "--model", str(llama.path)]
    output, _ = _swarm_until_ctrl_c(base)
    workdir = Path(output.split("logs: ", 1)[1].split()[0])
    try:
        assert f"logs kept in {workdir}" in output
        logs = sorted(path.name for path in workdir.glob("*.log"))
        assert logs == ["bootstrap.log", "peer0-0.log", "peer1-0.log"]
        keys = {path.name: path.read_bytes() for path in workdir.glob("*.key")}
        again, _ = _swarm_until_ctrl_c([*base, "--workdir", str(workdir)])  # same identities
        assert "swarm ready" in again
        assert {path.name: path.read_bytes() for path in workdir.glob("*.key")} == keys
    finally:
        for path in workdir.iterdir():
            path.unlink()
        os.rmdir(workdir)
