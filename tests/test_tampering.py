"""Tampering peers are caught: a bad signature on its first reply, wrong values by spot-checks.

The session is opened while the two tamperers are the only peers, so its route must go
through both; honest peers join before the first token is generated. With
``verify_fraction=1`` every hop of every step is checked, so no tampered activation ever
reaches the LM head and the generation equals transformers' token for token.
"""

from __future__ import annotations

import logging
import random
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


class ScriptedDraws:
    """The spot-checker's randomness, scripted: a check on the given draws only (the client
    draws once per hop per step, in route order)."""

    def __init__(self, checked_draws: set[int]):
        self.draws, self.checked_draws = 0, checked_draws

    def random(self) -> float:
        self.draws += 1
        return 0.0 if self.draws in self.checked_draws else 0.999

    def shuffle(self, items: list) -> None:
        random.shuffle(items)


@pytest.mark.parametrize(
    ("checked_draws", "caught_at_step"),
    # step 20's draw for the first hop (2 hops a step); none: only the closing check runs,
    # after the 40th step (the prompt and 39 tokens; the last token is never fed)
    [({39}, 20), (set(), 40)],
    ids=["by-a-later-step", "by-the-closing-check"],
)
def test_a_single_lie_is_caught_and_the_tokens_it_led_to_are_made_again(
    llama: ModelSource, prompt, tmp_path, checked_draws, caught_at_step
) -> None:
    """The first hop lies at its third decode step only (position 12). A check re-runs the
    hop's whole sequence, so a check of a later step sees the lie, and the generation ends with
    a check of every hop that runs surely. By then the lie has reached the next hop's cache and
    the tokens after it: the session rewinds (to the start: a liar is trusted for none of its
    outputs) and the result equals transformers' greedy tokens. (The old code missed the lie
    without a random check after it, and when one came, kept the tokens the lie had led to:
    they differed from token 17 on.)"""
    new_tokens = 40
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    want = reference.generate(
        prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0].tolist()
    with LocalSwarm(0, source=llama, workdir=tmp_path) as swarm:
        liar = swarm.start_peer("lies-once", (0, 3), launcher=launcher("noise-once"))
        last = swarm.start_peer("honest-last", (3, 6))
        swarm.wait_until_ready(timeout=180)
        with (
            DistributedModelForCausalLM.from_pretrained(
                str(llama.path), initial_peers=swarm.initial_peers, verify_fraction=0.01
            ) as model,
            model.inference_session(max_length=PROMPT_LENGTH + new_tokens) as session,
        ):
            assert [hop.peer_id for hop in session.route] == [liar.peer_id, last.peer_id]
            session._session.verifier.rng = ScriptedDraws(checked_draws)
            # two, so that a third answer settles who lied
            verifiers = [swarm.start_peer(f"honest-verifier-{i}", (0, 3)) for i in range(2)]
            swarm.wait_until_ready(timeout=180)
            got = model.generate(
                prompt, session=session, max_new_tokens=new_tokens, eos_token_id=[]
            )
            evidence = list(session.evidence)
            banned = model.bans.banned()
    assert got[0].tolist() == want
    assert liar.peer_id in banned
    assert not {last.peer_id, *(peer.peer_id for peer in verifiers)} & banned
    (caught,) = evidence
    assert caught.banned == (liar.peer_id,)
    assert caught.step == caught_at_step


@pytest.mark.parametrize(
    ("mode", "wire_dtype"),
    [("scale", "bfloat16"), ("skip-block", "float32")],
    ids=["2%-scaling-on-a-bfloat16-wire", "a-cheaper-model"],
)
def test_subtle_tampering_on_every_step_is_caught(
    llama: ModelSource, prompt, tmp_path, mode: str, wire_dtype: str
) -> None:
    """A peer that scales every output by 2% (the old tolerance let it through with
    verify_fraction 1 on a bfloat16 wire), or skips one of its blocks, is caught on its first
    checked step, and the generation equals an honest route's."""
    with LocalSwarm(0, source=llama, workdir=tmp_path) as swarm:
        tamperer = swarm.start_peer(mode, (0, 3), launcher=launcher(mode))
        last = swarm.start_peer("honest-last", (3, 6))
        swarm.wait_until_ready(timeout=180)
        client = DistributedModelForCausalLM.from_pretrained(
            str(llama.path),
            initial_peers=swarm.initial_peers,
            verify_fraction=1.0,
            wire_dtype=wire_dtype,
        )
        with client as model, model.inference_session(PROMPT_LENGTH + NEW_TOKENS) as session:
            assert session.route[0].peer_id == tamperer.peer_id
            verifiers = [swarm.start_peer(f"honest-verifier-{i}", (0, 3)) for i in range(2)]
            swarm.wait_until_ready(timeout=180)
            got = model.generate(
                prompt, session=session, max_new_tokens=NEW_TOKENS, eos_token_id=[]
            )
            banned = model.bans.banned()
        honest_route = DistributedModelForCausalLM.from_pretrained(
            str(llama.path), initial_peers=swarm.initial_peers, wire_dtype=wire_dtype
        )
        with honest_route as model:
            model.bans.ban(tamperer.peer_id, "the test's tamperer")
            want = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert tamperer.peer_id in banned
    assert not {last.peer_id, *(peer.peer_id for peer in verifiers)} & banned
    assert got.tolist() == want.tolist()
