"""Eight lying peers beside two honest replicas: the liars announce every block at 1e9 tokens/s
with valid signed records, answer pings, and serve nobody (``lying_peers.py``). A client must
still reach an honest replica, generate exactly what transformers generates, and blame only
the liars; its next generation must not try them again.

The honest peers sit behind an emulated link (20 ms each way) and the liars on plain loopback,
so the liars are closer as well as claiming more: every one of them ranks before the honest
replicas, whatever the noise of RTTs measured on a busy machine."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
import torch
from lying_peers import Liars
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.links import LinkProfile
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

LIARS, PROMPT_LENGTH, NEW_TOKENS = 8, 8, 12
# a silent liar costs one stream opening, which waits at most this long
STEP_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def honest(llama: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """Two honest peers, each serving the whole (tiny) model, 20 ms away."""
    workdir = tmp_path_factory.mktemp("honest")
    far = LinkProfile(delay_ms=20)
    with LocalSwarm(2, source=llama, replicas=2, workdir=workdir, link=far) as swarm:
        swarm.wait_until_ready(timeout=180)
        yield swarm


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def expected(llama: ModelSource, prompt: torch.Tensor) -> list[int]:
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


@pytest.mark.parametrize("mode", ["refuse", "silent"])
def test_eight_liars_cannot_starve_a_client_of_the_honest_replicas(
    mode, honest, llama, prompt, expected, tmp_path
):
    num_blocks = llama.config.num_hidden_layers
    with (
        Liars(honest.initial_peers, llama.model_id, num_blocks, LIARS, mode, tmp_path) as liars,
        DistributedModelForCausalLM.from_pretrained(
            str(llama.path), initial_peers=honest.initial_peers, step_timeout=STEP_TIMEOUT
        ) as model,
    ):
        coverage = model.connection.coverage(llama.model_id, num_blocks)
        assert set(liars.peer_ids) <= set(coverage.peers()), "the liars' records are not read"

        started = time.monotonic()
        first = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        took = time.monotonic() - started
        reputation = model.router.reputation
        failures_after_first = {p: reputation.failure_chance(p) for p in liars.peer_ids}

        started = time.monotonic()
        again = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        took_again = time.monotonic() - started
        print(
            f"\n{LIARS} {mode} liars beside 2 honest replicas: first generation "
            f"{took:.2f} s, the next {took_again:.2f} s",
            file=sys.stderr,
        )
        honest_ids = {peer.peer_id for peer in honest.peers}
        blamed = model.bans.banned() | set(reputation.cooling())
        assert first[0].tolist() == expected
        assert again[0].tolist() == expected
        # nobody honest was banned (one slow to open could lose a race and be cooled down)
        assert not model.bans.banned() & honest_ids
        # the first generation tried every liar (they ranked first), each blamed for it
        tried = {p for p in liars.peer_ids if reputation.failure_chance(p) > 0.5}
        assert tried == set(liars.peer_ids) and tried <= blamed
        if mode == "silent":  # those that timed out are banned; the rest lost the race
            assert tried & model.bans.banned()
        # the next generation tried none of them
        assert {p: reputation.failure_chance(p) for p in liars.peer_ids} == failures_after_first
