"""``SpotChecker.check`` on its own: who gets asked, who gets banned, when the hop fails.

The verifiers are stand-ins for ``signed_forward`` (the network and signatures are tested in
``test_tampering.py`` with real peers); honest ones compute the same function of the inputs
the checked hop would, liars add noise, others fail or sign badly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from swarmllm.client import verification
from swarmllm.client.bans import BanList
from swarmllm.client.hop import HopFailure, SignedReply
from swarmllm.client.routing import Hop
from swarmllm.client.verification import SpotChecker
from swarmllm.dht.records import CoverageMap, PeerRecord, PeerState
from swarmllm.security.signing import SignatureError

HIDDEN = 16
CHECKED = "checked"


def honest(inputs: torch.Tensor) -> torch.Tensor:
    """What every honest peer computes for blocks [2, 4) (a stand-in for the real span)."""
    return torch.tanh(inputs * 1.5) + 0.25


def liar(inputs: torch.Tensor) -> torch.Tensor:
    return honest(inputs) + 0.1


def nan(inputs: torch.Tensor) -> torch.Tensor:
    return torch.full_like(inputs, float("nan"))


def unreachable(inputs: torch.Tensor) -> torch.Tensor:
    raise ConnectionError("no route to peer")


def bad_signature(inputs: torch.Tensor) -> torch.Tensor:
    raise SignatureError("signature does not match the peer id", "forger", 0)


def record(start: int = 0, end: int = 6, state: PeerState = PeerState.ONLINE) -> PeerRecord:
    return PeerRecord(state, start, end, 10.0, 1000, "0.1.0", "float32")


class FixedOrder:
    """Always checks, and asks candidates in the order the coverage map lists them."""

    def random(self) -> float:
        return 0.0

    def shuffle(self, items: list) -> None:
        pass


@dataclass
class FakeRouter:
    records: dict[str, PeerRecord]
    bans: BanList = field(default_factory=BanList)
    allowed: frozenset[str] | None = None
    min_precision: str | None = None
    connection: object = None
    joined: dict[str, PeerRecord] = field(default_factory=dict)  # seen by a fresh read only
    fresh_reads: int = 0

    async def read_coverage(self, fresh: bool) -> tuple[CoverageMap, bool]:
        if fresh:
            self.fresh_reads += 1
            self.records.update(self.joined)
        blocks = [{p: r for p, r in self.records.items() if r.start <= b < r.end} for b in range(6)]
        return CoverageMap("m", 6, blocks), False


@dataclass
class Check:
    """One spot-check of hop [2, 4) by ``CHECKED``, whose answer is ``checked(inputs)``."""

    checked: Callable[[torch.Tensor], torch.Tensor]
    verifiers: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    records: dict[str, PeerRecord] | None = None
    # what the checked peer answered for the earlier tokens (default: ``checked``)
    past: Callable[[torch.Tensor], torch.Tensor] | None = None
    joined: dict[str, PeerRecord] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def run(self, monkeypatch: pytest.MonkeyPatch, fraction: float = 1.0) -> SpotChecker:
        records = self.records or {CHECKED: record(), **{p: record() for p in self.verifiers}}
        router = self.router = FakeRouter(records, joined=self.joined)
        checker = SpotChecker(router, fraction)
        checker.rng = FixedOrder()
        generator = torch.Generator().manual_seed(0)
        history = [torch.randn(1, 5, HIDDEN, generator=generator)]
        hidden = torch.randn(1, 1, HIDDEN, generator=generator)
        output = self.checked(torch.cat([*history, hidden], dim=1))[:, -1:]
        past_outputs = [(self.past or self.checked)(history[0])]
        hop = Hop(CHECKED, 2, 4)
        digest = SimpleNamespace(input_digest=b"\1" * 8, output_digest=b"\2" * 8)
        stream = SimpleNamespace(
            hop=hop,
            spec=SimpleNamespace(
                session_id="s", model_id="m", pad_lengths=None, timeout_for=lambda n: 5.0
            ),
            steps_sent=3,
            last_replies=[SignedReply(CHECKED, digest, b"sig", output)],  # the step's own reply
        )

        async def fake_signed_forward(connection, hop: Hop, model_id, inputs, **options):
            self.asked.append(hop.peer_id)
            assert (hop.start, hop.end) == (2, 4) and inputs.shape == (1, 6, HIDDEN)
            try:
                out = self.verifiers[hop.peer_id](inputs)
            except (ConnectionError, SignatureError) as e:
                raise HopFailure(hop, str(e)) from e
            return SignedReply(hop.peer_id, digest, b"sig", out)

        monkeypatch.setattr(verification, "signed_forward", fake_signed_forward)
        self.failure: HopFailure | None = None
        try:
            asyncio.run(checker.check(stream, history, past_outputs, hidden, output, position=5))
        except HopFailure as failure:
            self.failure = failure
        self.banned = router.bans.banned()
        return checker


def test_an_agreeing_verifier_ends_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    check = Check(honest, {"v": honest, "t": honest})
    checker = check.run(monkeypatch)
    assert check.asked == ["v"] and not check.banned and check.failure is None
    assert checker.evidence == []


def test_a_liar_outvoted_by_two_fails_its_hop_and_nobody_else_is_banned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = Check(liar, {"v": honest, "t": honest})
    checker = check.run(monkeypatch)
    assert check.asked == ["v", "t"]
    assert check.failure is not None and check.failure.hop.peer_id == CHECKED
    assert not check.banned  # the session's failover bans the checked hop; verifiers stay
    (evidence,) = checker.evidence
    assert evidence.banned == (CHECKED,)
    assert [reply.peer_id for reply in evidence.replies] == [CHECKED, "v", "t"]


def test_a_check_catches_a_lie_at_an_earlier_step_of_the_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = Check(honest, {"v": honest, "t": honest}, past=liar)
    checker = check.run(monkeypatch)
    assert check.failure is not None and check.failure.hop.peer_id == CHECKED
    assert "position 0" in check.failure.reason
    assert checker.evidence[0].banned == (CHECKED,)


@pytest.mark.parametrize("verifier", [liar, nan], ids=["noisy", "nan"])
def test_a_lying_verifier_is_banned_and_the_honest_hop_kept(
    monkeypatch: pytest.MonkeyPatch, verifier: Callable
) -> None:
    check = Check(honest, {"v": verifier, "t": honest})
    checker = check.run(monkeypatch)
    assert check.asked == ["v", "t"]
    assert check.failure is None
    assert check.banned == {"v"}
    assert checker.evidence[0].banned == ("v",)


def test_the_tie_breaker_is_the_next_verifier_that_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    check = Check(honest, {"v": liar, "down": unreachable, "forger": bad_signature, "t": honest})
    check.run(monkeypatch)
    assert check.asked == ["v", "down", "forger", "t"]
    assert check.failure is None
    assert check.banned == {"v", "forger"}  # the one that lied and the one that signed badly


def test_two_answers_that_disagree_with_no_third_ban_both(monkeypatch: pytest.MonkeyPatch) -> None:
    check = Check(honest, {"v": liar, "down": unreachable})
    checker = check.run(monkeypatch)
    assert check.failure is not None and check.failure.hop.peer_id == CHECKED
    assert check.banned == {"v"}
    assert checker.evidence[0].banned == (CHECKED, "v")


def test_three_different_answers_trust_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    def other_liar(inputs: torch.Tensor) -> torch.Tensor:
        return honest(inputs) - 0.1

    check = Check(honest, {"v": liar, "t": other_liar, "unused": honest})
    check.run(monkeypatch)
    assert check.asked == ["v", "t"]  # three answers is all a check asks for
    assert check.failure is not None and check.banned == {"v", "t"}


def test_only_online_unbanned_peers_serving_the_whole_hop_are_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = {
        CHECKED: record(),
        "partial": record(3, 6),
        "joining": record(state=PeerState.JOINING),
        "offline": record(state=PeerState.OFFLINE),
        "fits": record(2, 4),
    }
    check = Check(honest, {peer: honest for peer in records if peer != CHECKED}, records)
    check.run(monkeypatch)
    assert check.asked == ["fits"]


def test_no_other_server_means_no_check(monkeypatch: pytest.MonkeyPatch) -> None:
    check = Check(liar, {}, {CHECKED: record(), "partial": record(3, 6)})
    checker = check.run(monkeypatch)
    assert check.asked == [] and check.failure is None and checker.evidence == []


def test_verifiers_that_joined_after_the_map_was_read_are_found_by_a_fresh_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = Check(
        liar, {"v": honest, "t": honest}, {CHECKED: record()}, joined=dict.fromkeys("vt", record())
    )
    check.run(monkeypatch)
    assert check.router.fresh_reads == 1 and check.asked == ["v", "t"]
    assert check.failure is not None and check.failure.hop.peer_id == CHECKED


def test_fraction_zero_never_checks_and_bad_fractions_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check = Check(liar, {"v": honest})
    check.run(monkeypatch, fraction=0.0)
    assert check.asked == [] and check.failure is None
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match="verify_fraction must be within"):
            SpotChecker(FakeRouter({}), fraction)
