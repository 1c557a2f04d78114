"""Rebalancing in a real swarm: when every peer of a span is killed, one peer that chose its own
blocks and serves a span that another peer serves too moves to cover it, without leaving its
old blocks uncovered at any moment, and generation then equals local greedy."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.dht.records import CoverageMap, PeerState
from swarmllm.swarm import LocalSwarm, PeerProcess

pytestmark = pytest.mark.slow

FAST = ["--refresh-period", "2"]
MOVER = ["--num-blocks", "2", "--balance-period", "2", "--drain-timeout", "5"]
MOVE_TIMEOUT = 90.0  # seconds for the mover to notice the gap, load its new span and serve it
NEW_TOKENS = 12
SETTLED = 4.0  # seconds (two balance periods) the spans must hold to count as settled


def _moves(peer: PeerProcess) -> int:
    return peer.log_path.read_text().count("swarmllm peer moved")


def _online_spans(coverage: CoverageMap) -> dict[str, tuple[int, int]]:
    return {
        peer_id: (record.start, record.end)
        for peer_id, record in coverage.peers().items()
        if record.state == PeerState.ONLINE
    }


def _settled_spans(read: Callable[[], CoverageMap], seconds: float) -> dict[str, tuple[int, int]]:
    """The peers' ONLINE spans once two reads ``SETTLED`` seconds apart agree and nobody is
    JOINING (no move under way); fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    before = read()
    while time.monotonic() < deadline:
        time.sleep(SETTLED)
        now = read()
        joining = [r for r in now.peers().values() if r.state == PeerState.JOINING]
        if not joining and _online_spans(now) == _online_spans(before):
            return _online_spans(now)
        before = now
    raise AssertionError(f"the swarm did not settle in {seconds} s: {_online_spans(before)}")


def _victims(
    peers: list[PeerProcess], spans: dict[str, tuple[int, int]], num_blocks: int
) -> list[PeerProcess]:
    """Every peer serving some block, chosen so that the others leave it uncovered and one of
    them serves only blocks that others serve too (it can move without opening a gap)."""
    for block in range(num_blocks):
        victims = [p for p in peers if spans[p.peer_id][0] <= block < spans[p.peer_id][1]]
        survivors = [p for p in peers if p not in victims]

        def served_by_others(peer: PeerProcess, survivors=survivors) -> bool:
            others = [spans[p.peer_id] for p in survivors if p is not peer]
            return all(any(a <= b < z for a, z in others) for b in range(*spans[peer.peer_id]))

        if any(served_by_others(peer) for peer in survivors):
            return victims
    raise AssertionError(f"no span can lose its peers with a replica left to move: {spans}")


def test_a_replica_moves_to_cover_a_span_whose_peers_all_died(llama: ModelSource, tmp_path):
    """Six peers that chose their own blocks (each block served by one to three of them, by
    their throughputs); every peer of one block is killed; peers whose blocks others serve too
    move into the gap, each once, and the swarm settles."""
    num_blocks = llama.config.num_hidden_layers
    with LocalSwarm(0, source=llama, workdir=tmp_path, peer_args=FAST) as swarm:
        for index in range(6):
            swarm.start_peer(f"auto{index}", blocks=None, extra_args=MOVER)
        swarm.wait_until_ready(timeout=300)
        with SwarmConnection(swarm.initial_peers) as connection:
            dead: set[str] = set()  # killed peers' records outlive them a while

            def read() -> CoverageMap:
                return connection.coverage(llama.model_id, num_blocks).without(dead)

            spans = _settled_spans(read, MOVE_TIMEOUT)
            victims = _victims(swarm.peers, spans, num_blocks)
            survivors = [peer for peer in swarm.peers if peer not in victims]
            moves = {peer.name: _moves(peer) for peer in survivors}
            for victim in victims:
                victim.send_signal(signal.SIGKILL)
            for victim in victims:
                victim.process.wait(timeout=30)
            dead |= {victim.peer_id for victim in victims}
            samples = [read()]
            deadline = time.monotonic() + MOVE_TIMEOUT
            while not samples[-1].fully_covered and time.monotonic() < deadline:
                time.sleep(0.5)
                samples.append(read())
            logs = "\n".join(peer.log_tail(8) for peer in survivors)
            assert samples[-1].fully_covered, logs
            final = _settled_spans(read, MOVE_TIMEOUT)
        gap = {block for start, end in samples[0].uncovered_ranges() for block in range(start, end)}
        assert gap, spans
        movers = [peer for peer in survivors if final[peer.peer_id] != spans[peer.peer_id]]
        assert any(gap & set(range(*final[peer.peer_id])) for peer in movers), (final, logs)
        # each move raised the bottleneck by the quality margin, so nobody moved back and forth
        # (more than one peer may move: the peers' measured throughputs differ)
        for peer in survivors:
            assert _moves(peer) - moves[peer.name] == (peer in movers), logs
        for coverage in samples:  # the blocks served after the kill stayed served throughout
            assert all(coverage.online(block) for block in range(num_blocks) if block not in gap)

        with DistributedModelForCausalLM.from_pretrained(
            str(llama.path), initial_peers=swarm.initial_peers
        ) as model:
            prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
            output = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])
            route = model.new_session(32)
            model.connection.run(route.open())
            hops = [(hop.peer_id, hop.start, hop.end) for hop in route.route]
            model.connection.run(route.close())
        assert any(hop[0] in {peer.peer_id for peer in movers} for hop in hops), hops
        local = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = local.generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )
        assert output.tolist() == expected.tolist()
