"""Tampering peers are caught: a bad signature on its first reply, wrong values by spot-checks.

The session is opened while the two tamperers are the only peers, so its route must go
through both; honest peers join before the first token is generated. With
``verify_fraction=1`` every hop of every step is checked, so no tampered activation ever
reaches the LM head and the generation equals transformers' token for token.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.verification import TOLERANCES, VerificationEvidence, relative_error
from swarmllm.security.signing import verify_activation
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

TAMPERING_PEER = Path(__file__).with_name("tampering_peer.py")
PROMPT_LENGTH, NEW_TOKENS = 10, 12


def launcher(mode: str) -> list[str]:
    return [sys.executable, str(TAMPERING_PEER), mode]


@dataclass
class Outcome:
    wrong_key: str
    noisy: str
    honest: set[str]
    opened_route: list[str]
    final_route: list[str]
    banned: set[str]
    tokens: list[int]
    evidence: list[VerificationEvidence]
    client_logs: list[logging.LogRecord]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def expected(llama: ModelSource, prompt: torch.Tensor) -> list[int]:
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


@pytest.fixture(scope="module")
def outcome(llama: ModelSource, prompt: torch.Tensor, tmp_path_factory) -> Iterator[Outcome]:
    records = _Records()
    client_logger = logging.getLogger("swarmllm.client")
    client_logger.addHandler(records)
    try:
        with LocalSwarm(0, source=llama, workdir=tmp_path_factory.mktemp("tampering")) as swarm:
            wrong_key = swarm.start_peer("wrong-key", (0, 3), launcher=launcher("wrong-key"))
            noisy = swarm.start_peer("noisy", (3, 6), launcher=launcher("noise"))
            swarm.wait_until_ready(timeout=180)
            with (
                DistributedModelForCausalLM.from_pretrained(
                    str(llama.path), initial_peers=swarm.initial_peers, verify_fraction=1.0
                ) as model,
                model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS) as session,
            ):
                opened_route = [hop.peer_id for hop in session.route]
                honest = [
                    swarm.start_peer("honest-a", (0, 3)),
                    swarm.start_peer("honest-b", (3, 6)),
                    swarm.start_peer("honest-c", (3, 6)),
                ]
                swarm.wait_until_ready(timeout=180)
                output = model.generate(
                    prompt, session=session, max_new_tokens=NEW_TOKENS, eos_token_id=[]
                )
                yield Outcome(
                    wrong_key=wrong_key.peer_id,
                    noisy=noisy.peer_id,
                    honest={peer.peer_id for peer in honest},
                    opened_route=opened_route,
                    final_route=[hop.peer_id for hop in session.route],
                    banned=model.bans.banned(),
                    tokens=output[0].tolist(),
                    evidence=list(session.evidence),
                    client_logs=records.records,
                )
    finally:
        client_logger.removeHandler(records)


def test_the_session_started_on_the_tampering_peers(outcome: Outcome) -> None:
    assert outcome.opened_route == [outcome.wrong_key, outcome.noisy]


def test_generation_through_tamperers_equals_transformers(outcome: Outcome, expected) -> None:
    assert outcome.tokens == expected
    assert set(outcome.final_route) <= outcome.honest
    assert {outcome.wrong_key, outcome.noisy} <= outcome.banned
    assert not outcome.honest & outcome.banned


def test_a_bad_signature_is_caught_on_the_first_reply(outcome: Outcome) -> None:
    bad_signatures = [
        r.getMessage() for r in outcome.client_logs if "bad signature" in r.getMessage()
    ]
    assert bad_signatures, "the wrong-key peer was never caught"
    assert bad_signatures[0].startswith(f"bad signature from {outcome.wrong_key} at step 1 ")
    assert all(outcome.wrong_key in message for message in bad_signatures)


def test_valid_signatures_over_wrong_values_are_caught_by_spot_checks(outcome: Outcome) -> None:
    (evidence,) = outcome.evidence  # caught on its first step, then never routed to again
    assert evidence.banned == (outcome.noisy,)
    assert (evidence.start, evidence.end, evidence.step, evidence.position) == (3, 6, 1, 0)
    checked, *verifiers = evidence.replies
    assert checked.peer_id == outcome.noisy
    assert len(verifiers) == 2 and {r.peer_id for r in verifiers} <= outcome.honest
    for reply in evidence.replies:  # every reply is properly signed: the evidence stands
        verify_activation(reply.peer_id, reply.digest, reply.signature)
    honest_a, honest_b = (reply.output[:, -PROMPT_LENGTH:] for reply in verifiers)
    tolerance = TOLERANCES["float32"]
    assert relative_error(honest_a, honest_b) <= tolerance
    assert relative_error(checked.output, honest_a) > 10 * tolerance


def test_a_single_lie_is_caught_by_a_later_spot_check(llama: ModelSource, prompt, tmp_path) -> None:
    """A peer that lies at its third decode step only, with a quarter of steps checked: a check
    re-runs the hop's whole sequence and compares every earlier token too (a check of the one
    step alone would miss it three times in four; this one misses it with 0.75^38 < 2e-5)."""
    with LocalSwarm(0, source=llama, workdir=tmp_path) as swarm:
        first = swarm.start_peer("honest-first", (0, 3))
        liar = swarm.start_peer("lies-once", (3, 6), launcher=launcher("noise-once"))
        swarm.wait_until_ready(timeout=180)
        with (
            DistributedModelForCausalLM.from_pretrained(
                str(llama.path), initial_peers=swarm.initial_peers, verify_fraction=0.25
            ) as model,
            model.inference_session(max_length=PROMPT_LENGTH + 40) as session,
        ):
            assert [hop.peer_id for hop in session.route] == [first.peer_id, liar.peer_id]
            # two, so that a third answer settles who lied
            verifiers = [swarm.start_peer(f"honest-verifier-{i}", (3, 6)) for i in range(2)]
            swarm.wait_until_ready(timeout=180)
            model.generate(prompt, session=session, max_new_tokens=40, eos_token_id=[])
            evidence = list(session.evidence)
            banned = model.bans.banned()
    assert liar.peer_id in banned
    assert not {first.peer_id, *(peer.peer_id for peer in verifiers)} & banned
    (caught,) = evidence
    assert caught.banned == (liar.peer_id,)
