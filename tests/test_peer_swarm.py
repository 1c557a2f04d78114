"""Peers as real processes on loopback: coverage, RPCs, shutdown, block selection, budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from cli_runner import run_cli
from hivemind.utils import get_dht_time

from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec, remote_forward
from swarmllm.client.routing import Hop
from swarmllm.dht.announce import announce
from swarmllm.dht.node import swarm_dht
from swarmllm.dht.records import PeerRecord, PeerState
from swarmllm.security.identity import load_or_create_identity, peer_id_of
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

REFRESH = ["--refresh-period", "2"]


@pytest.fixture(scope="module")
def swarm(llama: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(
        3,
        source=llama,
        workdir=tmp_path_factory.mktemp("swarm"),
        peer_args=[*REFRESH, "--cache-tokens", "256"],
    ) as running:
        running.wait_until_ready(timeout=120)
        yield running


@pytest.fixture(scope="module")
def connection(swarm: LocalSwarm) -> Iterator[SwarmConnection]:
    with SwarmConnection(swarm.initial_peers) as conn:
        yield conn


def test_coverage_shows_every_block_online_with_the_right_spans(swarm, connection, llama):
    coverage = connection.coverage(llama.model_id, llama.config.num_hidden_layers)
    assert coverage.fully_covered
    spans = {peer.peer_id: peer.blocks for peer in swarm.peers}
    for block, per_block in enumerate(coverage.blocks):
        ((peer_id, record),) = per_block.items()
        assert record.state == PeerState.ONLINE
        assert spans[peer_id] == (record.start, record.end)
        assert record.start <= block < record.end
        assert record.decode_steps_per_s > 0


def _local_span(llama: ModelSource, start: int, end: int) -> BlockSpan:
    return BlockSpan.from_weights(llama.config, llama.weight_files(), start, end)


def test_forward_and_inference_reproduce_the_local_span(swarm, connection, llama):
    peer = swarm.peers[1]
    start, end = peer.blocks
    hop = Hop(peer.peer_id, start, end)
    local = _local_span(llama, start, end)
    torch.manual_seed(0)
    prompt = torch.randn(1, 12, llama.config.hidden_size)
    steps = [torch.randn(1, 1, llama.config.hidden_size) for _ in range(5)]

    remote = connection.run(remote_forward(connection, hop, llama.model_id, prompt), timeout=60)
    torch.testing.assert_close(remote, local(prompt), atol=1e-5, rtol=0)

    cache = local.new_cache()
    expected = [local(prompt, cache)] + [local(x, cache) for x in steps]
    spec = SessionSpec(llama.model_id, "test-session", max_length=32)

    async def run_session() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stream = HopStream(connection, hop, spec)
        await stream.open()
        try:
            first = [await stream.step(prompt, 0)]
            for i, x in enumerate(steps):
                first.append(await stream.step(x, 12 + i))
            # rewind: re-send from position 12 and get the same outputs again
            again = [await stream.step(x, 12 + i) for i, x in enumerate(steps)]
        finally:
            await stream.close()
        return first, again

    first, again = connection.run(run_session(), timeout=60)
    for got, want in zip(first, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(again, expected[1:], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_session_over_the_cache_budget_is_refused_while_another_keeps_working(
    swarm, connection, llama
):
    """The peer's 256 cache tokens: one client may reserve half of them. Two clients hold 100
    each; a third asking for 100 finds the budget full, and the first asking for 40 more (which
    the budget has) finds its own share used up. Both refusals are "busy", not faults."""
    peer = swarm.peers[0]
    hop = Hop(peer.peer_id, *peer.blocks)
    hidden = torch.randn(1, 4, llama.config.hidden_size)

    def spec(name: str, max_length: int) -> SessionSpec:
        return SessionSpec(llama.model_id, name, max_length=max_length)

    def refusal(client: SwarmConnection, stream_spec: SessionSpec) -> HopFailure:
        stream = HopStream(client, hop, stream_spec)
        with pytest.raises(HopFailure) as refused:
            client.run(stream.open(), timeout=30)
        client.run(stream.close(), timeout=30)
        return refused.value

    with (
        SwarmConnection(swarm.initial_peers) as other,
        SwarmConnection(swarm.initial_peers) as third,
    ):
        holders = [(connection, spec("a", 100)), (other, spec("b", 100))]
        streams = [(client, HopStream(client, hop, held)) for client, held in holders]
        try:
            for client, stream in streams:
                client.run(stream.open(), timeout=30)
            budget = refusal(third, spec("greedy", 100))
            share = refusal(connection, spec("a-more", 40))
            first = streams[0][1]
            connection.run(first.step(hidden, 0), timeout=30)  # the holders are unaffected
            connection.run(first.step(hidden[:, :1], 4), timeout=30)
        finally:
            for client, stream in streams:
                client.run(stream.close(), timeout=30)
    assert "busy" in budget.reason and "cache tokens" in budget.reason
    assert "are free" in budget.reason and "per-peer share" in share.reason
    assert not budget.fault and not share.fault  # the client routes elsewhere without banning


def test_automatic_block_selection_covers_the_model(llama, tmp_path):
    num_blocks = llama.config.num_hidden_layers
    with LocalSwarm(1, source=llama, workdir=tmp_path, peer_args=REFRESH) as swarm:
        swarm.peers[0].send_signal(signal.SIGTERM)  # keep only the bootstrap node
        swarm.peers[0].process.wait(timeout=30)
        swarm.peers.clear()
        for i in range(3):
            swarm.start_peer(f"auto{i}", blocks=None, extra_args=["--num-blocks", "2"])
            swarm.wait_until_ready(timeout=120, full_coverage=False)
        with SwarmConnection(swarm.initial_peers) as conn:
            coverage = conn.coverage(llama.model_id, num_blocks)
        assert coverage.fully_covered, coverage.uncovered_ranges()
        spans = sorted((r.start, r.end) for r in coverage.peers().values())
        assert spans == [(0, 2), (2, 4), (4, 6)]


def test_peers_started_together_spread_and_ignore_a_dead_peers_record(llama, tmp_path):
    """Three ``--num-blocks`` peers started at once, while a killed peer's record still says
    ONLINE for blocks 0-1: they must not trust it, nor pick the same blocks as each other."""
    num_blocks = llama.config.num_hidden_layers
    with LocalSwarm(0, source=llama, workdir=tmp_path, peer_args=REFRESH) as swarm:
        ghost_key = tmp_path / "ghost.key"
        ghost = swarm_dht(
            ghost_key,
            load_or_create_identity(ghost_key),
            initial_peers=swarm.initial_peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            start=True,
        )
        try:
            # far faster than any real peer: counted, it would keep everyone off blocks 0-1
            dead = PeerRecord(PeerState.ONLINE, 0, 2, 1e6, 4096, "0.1.0", "float32")
            announce(ghost, llama.model_id, [0, 1], dead, get_dht_time() + 600)
        finally:
            ghost.shutdown()
        for i in range(3):
            swarm.start_peer(f"together{i}", blocks=None, extra_args=["--num-blocks", "2"])
        swarm.wait_until_ready(timeout=240)
        with SwarmConnection(swarm.initial_peers) as conn:
            coverage = conn.coverage(llama.model_id, num_blocks)
        records = coverage.peers()
        assert peer_id_of(load_or_create_identity(ghost_key)) in records  # still announced
        spans = sorted((records[p.peer_id].start, records[p.peer_id].end) for p in swarm.peers)
        assert spans == [(0, 2), (2, 4), (4, 6)]


def test_sigterm_marks_the_peer_offline_and_exits_zero(llama, tmp_path):
    with LocalSwarm(2, source=llama, workdir=tmp_path, peer_args=REFRESH) as swarm:
        swarm.wait_until_ready(timeout=120)
        leaving = swarm.peers[0]
        with SwarmConnection(swarm.initial_peers) as conn:
            leaving.send_signal(signal.SIGTERM)
            assert leaving.process.wait(timeout=30) == 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                coverage = conn.coverage(llama.model_id, llama.config.num_hidden_layers)
                record = coverage.peers().get(leaving.peer_id)
                if record is None or record.state == PeerState.OFFLINE:
                    break
                time.sleep(0.5)
            assert record is None or record.state == PeerState.OFFLINE
            assert coverage.uncovered_ranges() == [leaving.blocks]


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            with open(f"/proc/{entry}/stat") as stat:  # "pid (name) state ppid ..."
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_no_node_of_a_local_swarm_maps_ports_on_the_lan(swarm, connection):
    """hivemind's p2pd defaults to UPnP/NAT-PMP discovery on the LAN: the bootstrap node, every
    peer and the client must all start their daemon with it off."""
    daemons = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().decode().split("\0")
        except FileNotFoundError:
            continue
        if argv and os.path.basename(argv[0]) == "p2pd":
            daemons.append(argv)
    assert len(daemons) >= len(swarm.peers) + 2  # peers, bootstrap, this test's client
    for argv in daemons:
        assert "-natPortMap=0" in argv, argv


def test_a_peer_killed_with_sigkill_leaves_no_process_behind(llama, tmp_path):
    with LocalSwarm(1, source=llama, workdir=tmp_path) as swarm:
        swarm.wait_until_ready(timeout=120)
        victim = swarm.peers[0]
        helpers = _descendants(victim.pid)  # its DHT process and p2p daemon
        assert len(helpers) >= 2, helpers
        victim.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(map(_alive, helpers)):
            time.sleep(0.5)
        assert not [pid for pid in helpers if _alive(pid)]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--blocks", "3:2"], "invalid block range"),
        (["--blocks", "0:99"], "outside the model"),
        (["--blocks", "x"], "invalid block range"),
        (["--initial-peers", "not-a-multiaddr"], "invalid multiaddr"),
        (["--host-maddrs", "/ip4/300.1.1.1/tcp/0"], "invalid multiaddr"),
        (["--identity", "{corrupt}"], "identity"),
    ],
)
def test_invalid_peer_arguments_exit_with_one_clear_line(args, complaint, llama, tmp_path):
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(b"not a key")
    args = [a.replace("{corrupt}", str(corrupt)) for a in args]
    started = time.monotonic()
    result = run_cli("peer", "--model", str(llama.path), *args)
    assert result.returncode != 0
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_status_reports_every_peer_and_full_coverage(swarm, llama):
    def status(*options: str) -> subprocess.CompletedProcess:
        return run_cli(
            "status", "--model", str(llama.path), "--initial-peers", *swarm.initial_peers, *options
        )

    result = status("--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fully_covered"] and report["uncovered"] == []
    rows = {row["peer_id"]: row for row in report["peers"]}
    for peer in swarm.peers:
        row = rows[peer.peer_id]
        assert tuple(row["blocks"]) == peer.blocks
        assert row["state"] == "ONLINE" and row["ping_ms"] is not None
        assert row["decode_steps_per_s"] > 0 and row["cache_tokens_left"] > 0
        assert row["adapters"] == []  # a text-only model

    table = status()
    assert table.returncode == 0 and "fully covered" in table.stdout


def test_swarm_command_comes_up_and_stops_cleanly_on_ctrl_c(llama, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "swarmllm.cli", "swarm", "--peers", "2", "--model", str(llama.path)]
        + ["--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            lines.append(process.stdout.readline())
        assert any("swarm ready" in line for line in lines), lines
        assert any("swarmllm generate" in line for line in lines)
        peer_pids = [int(line.split("pid ")[1].rstrip(")\n")) for line in lines if "(pid " in line]
        assert len(peer_pids) == 2
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        assert "swarm stopped" in output
        for pid in peer_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
