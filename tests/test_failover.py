"""Failover mid-generation: a peer killed or frozen while a session uses it."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from streamers import AfterTokens
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import ClientSession, DistributedModelForCausalLM
from swarmllm.client.routing import Hop, NoRouteError
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT_LENGTH, NEW_TOKENS, FAIL_AFTER = 12, 30, 10
# far longer than a failover takes: a lost peer must be noticed by its dropped stream or an
# unanswered ping, not by this timeout
STEP_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def expected(llama: ModelSource, prompt: torch.Tensor) -> list[int]:
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def _swarm(llama: ModelSource, tmp_path, replicas: int) -> LocalSwarm:
    return LocalSwarm(3 * replicas, source=llama, replicas=replicas, workdir=tmp_path)


def _generate(model: DistributedModelForCausalLM, prompt, streamer, session) -> list[int]:
    output = model.generate(
        prompt, session=session, streamer=streamer, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    )
    return output[0].tolist()


def _middle_peer(swarm: LocalSwarm, session: ClientSession):
    return swarm.peer(session.route[len(session.route) // 2].peer_id)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_generation_survives_losing_a_peer_mid_way(how, llama, prompt, expected, tmp_path):
    with _swarm(llama, tmp_path, replicas=2) as swarm:
        swarm.wait_until_ready(timeout=180)
        with DistributedModelForCausalLM.from_pretrained(
            str(llama.path), initial_peers=swarm.initial_peers, step_timeout=STEP_TIMEOUT
        ) as model:
            with model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS) as session:
                victim = _middle_peer(swarm, session)
                signum = signal.SIGKILL if how == "kill" else signal.SIGSTOP
                streamer = AfterTokens(FAIL_AFTER, lambda: victim.send_signal(signum))
                started = time.monotonic()
                tokens = _generate(model, prompt, streamer, session)
                assert time.monotonic() - started < STEP_TIMEOUT / 2
                assert victim.peer_id not in {hop.peer_id for hop in session.route}
            assert victim.peer_id in model.bans.banned()
        assert tokens == expected


def test_losing_the_only_server_of_a_span_names_the_uncovered_blocks(llama, prompt, tmp_path):
    with _swarm(llama, tmp_path, replicas=1) as swarm:
        swarm.wait_until_ready(timeout=180)
        with (
            DistributedModelForCausalLM.from_pretrained(
                str(llama.path),
                initial_peers=swarm.initial_peers,
                step_timeout=2.0,
                failover_timeout=3.0,
            ) as model,
            model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS) as session,
        ):
            victim = _middle_peer(swarm, session)
            streamer = AfterTokens(5, lambda: victim.send_signal(signal.SIGKILL))
            started = time.monotonic()
            with pytest.raises(NoRouteError) as error:
                _generate(model, prompt, streamer, session)
            assert time.monotonic() - started < 30
        start, end = victim.blocks
        assert f"blocks {start}-{end - 1}" in str(error.value)
        # the failover waited its budget for another peer to take the blocks over
        assert "no peer came to serve them within 3 s" in str(error.value)
        cli = run_cli(
            "generate",
            "--model",
            str(llama.path),
            "--timeout",
            "2",
            "--initial-peers",
            *swarm.initial_peers,
            "hello",
        )
    assert cli.returncode != 0
    assert f"blocks {start}-{end - 1}" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr


def test_a_bad_output_bans_its_sender_and_fails_over_onto_a_peer_already_in_the_route(
    llama, prompt, expected, tmp_path
):
    """The route starts [NaN peer: 0-2] -> [honest: 3-5]. The client must see the NaN itself
    and ban its sender (not the honest next hop, which would refuse it); blocks 0-2 then fail
    over onto the honest peer, which already serves this session's blocks 3-5 on another
    stream. Greedy tokens equal transformers'."""
    tampering = [sys.executable, str(Path(__file__).with_name("tampering_peer.py")), "nan"]
    with LocalSwarm(0, source=llama, workdir=tmp_path) as swarm:
        honest = swarm.start_peer("honest", (0, 6))
        nan = swarm.start_peer("nan", (0, 3), launcher=tampering)
        swarm.wait_until_ready(timeout=180)
        with DistributedModelForCausalLM.from_pretrained(
            str(llama.path), initial_peers=swarm.initial_peers, step_timeout=STEP_TIMEOUT
        ) as model:
            real_route = model.router.route

            async def through_the_nan_peer_first(start, end, **options):
                if (start, end) == (0, 6):
                    return [Hop(nan.peer_id, 0, 3), Hop(honest.peer_id, 3, 6)]
                return await real_route(start, end, **options)

            model.router.route = through_the_nan_peer_first
            with model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS) as session:
                tokens = _generate(model, prompt, None, session)
                route = [(hop.peer_id, hop.start, hop.end) for hop in session.route]
            banned = model.bans.banned()
    assert banned == {nan.peer_id}
    assert route == [(honest.peer_id, 0, 3), (honest.peer_id, 3, 6)]
    assert tokens == expected
