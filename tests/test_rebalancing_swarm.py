"""Rebalancing in a real swarm: when every peer of a span is killed, a peer that chose its own
blocks and serves a span that others serve too moves to cover it, without leaving its old
blocks uncovered at any moment, and generation then equals local greedy."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.dht.records import CoverageMap, PeerState
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

FAST = ["--refresh-period", "2"]
MOVER = ["--num-blocks", "3", "--balance-period", "2", "--drain-timeout", "5"]
MOVE_TIMEOUT = 90.0  # seconds for the mover to notice the gap, load its new span and serve it
NEW_TOKENS = 12


def _online_spans(coverage: CoverageMap) -> dict[str, tuple[int, int]]:
    return {
        peer_id: (record.start, record.end)
        for peer_id, record in coverage.peers().items()
        if record.state == PeerState.ONLINE
    }


def test_a_replica_moves_to_cover_a_span_whose_peers_all_died(llama: ModelSource, tmp_path):
    with LocalSwarm(0, source=llama, workdir=tmp_path, peer_args=FAST) as swarm:
        low = swarm.start_peer("low", blocks=(0, 3))
        high = swarm.start_peer("high", blocks=(3, 6))
        swarm.wait_until_ready(timeout=180)
        mover = swarm.start_peer("mover", blocks=None, extra_args=MOVER)
        swarm.wait_until_ready(timeout=180)
        num_blocks = llama.config.num_hidden_layers
        with SwarmConnection(swarm.initial_peers) as connection:
            spans = _online_spans(connection.coverage(llama.model_id, num_blocks))
            # the mover replicates one span; kill the only peer of the other one
            victim = high if spans[mover.peer_id] == (0, 3) else low
            gap = victim.blocks
            victim.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=30)
            samples = []
            deadline = time.monotonic() + MOVE_TIMEOUT
            while time.monotonic() < deadline:
                coverage = connection.coverage(llama.model_id, num_blocks)
                samples.append(coverage)
                if _online_spans(coverage).get(mover.peer_id) == gap:
                    break
                time.sleep(0.5)
        assert _online_spans(samples[-1]).get(mover.peer_id) == gap, mover.log_tail(40)
        assert "swarmllm peer moved" in mover.log_path.read_text()
        kept = [block for block in range(num_blocks) if not gap[0] <= block < gap[1]]
        for coverage in samples:  # the blocks the mover left were served all along
            assert all(coverage.online(block) for block in kept)

        with DistributedModelForCausalLM.from_pretrained(
            str(llama.path), initial_peers=swarm.initial_peers
        ) as model:
            prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
            output = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])
            route = model.new_session(32)
            model.connection.run(route.open())
            hops = [(hop.peer_id, hop.start, hop.end) for hop in route.route]
            model.connection.run(route.close())
        assert (mover.peer_id, *gap) in hops
        local = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = local.generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )
        assert output.tolist() == expected.tolist()
