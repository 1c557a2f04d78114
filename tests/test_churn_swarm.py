"""Churn: eight peers that chose their own blocks, and a client generating one prompt after
another while a seeded schedule kills peers (half of them in the client's route, and once
every peer of one block) and starts new ones. Every generation completes and equals local
greedy; the report says how many failovers and how long the stalls and coverage gaps were."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.chaos import Chaos, chaos_schedule, run_churn
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

# float32: the tiny model's random logits are close enough for bfloat16 to change greedy tokens
PEER_ARGS = ["--refresh-period", "2", "--num-blocks", "2", "--balance-period", "3"]
PEER_ARGS += ["--dtype", "float32", "--drain-timeout", "5"]
PEERS = 8
NEW_TOKENS = 12
SEED = 11


def test_generations_survive_seeded_churn_and_equal_local_greedy(llama: ModelSource, tmp_path):
    generator = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, 128, (1, 6 + i), generator=generator) for i in range(3)]
    local = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = [
            local.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[
                0
            ].tolist()
            for p in prompts
        ]
    schedule = chaos_schedule(SEED, kills=3, span_kills=1, starts=3, every=4.0)
    with LocalSwarm(0, source=llama, workdir=tmp_path, peer_args=PEER_ARGS) as swarm:
        for index in range(PEERS):
            swarm.start_peer(f"auto{index}")
        swarm.wait_until_ready(timeout=300)
        with (
            DistributedModelForCausalLM.from_pretrained(
                str(llama.path),
                initial_peers=swarm.initial_peers,
                step_timeout=3.0,
                failover_timeout=90.0,
            ) as model,
            SwarmConnection(swarm.initial_peers) as watcher,
        ):
            chaos = Chaos(
                swarm,
                schedule,
                lambda: watcher.coverage(llama.model_id, llama.config.num_hidden_layers),
                seed=SEED,
                peer_args=PEER_ARGS,
                min_alive=4,
            )
            report = run_churn(
                model,
                chaos,
                prompts,
                expected,
                new_tokens=NEW_TOKENS,
                max_generations=1000,
                timeout=300,
            )
        logs = "\n".join(f"--- {p.name}\n{p.log_tail(6)}" for p in swarm.peers)
    print(report.summary(), report.events, sep="\n")
    failed = [g for g in report.generations if not g.correct]
    assert not failed, ([(g.tokens, g.error) for g in failed], expected, report.events, logs)
    actions = [event["action"].split(" ")[0] for event in report.events]
    assert actions.count("kill") == 3 and actions.count("kill-span") == 1, report.events
    assert report.failovers > 0, report.summary()  # the chaos did hit the client's routes
    # the span killed whole was re-covered by a peer that moved there, and nothing stayed open
    assert report.gaps and not report.open_gap, (report.summary(), logs)
