"""Routing that liars cannot starve, on stand-ins: the real Router, ``find_route`` and
``InferenceSession`` over a fake swarm whose liars announce 1e9 tokens/s and serve nobody."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
import torch
from transformers import LlamaConfig

import swarmllm.client.reputation as reputation_module
import swarmllm.client.session as session_module
from swarmllm.client.bans import BanList
from swarmllm.client.hop import HopFailure, SessionSpec
from swarmllm.client.profile import HopTiming
from swarmllm.client.reputation import Reputation, plausible_block_seconds
from swarmllm.client.router import Router
from swarmllm.client.routing import Hop, find_route
from swarmllm.client.session import InferenceSession, SessionFailedError
from swarmllm.dht.records import CoverageMap, PeerRecord, PeerState
from swarmllm.protocol import ErrorCode

BLOCKS, LIE = 4, 1e9


def record(throughput: float) -> PeerRecord:
    return PeerRecord(PeerState.ONLINE, 0, BLOCKS, throughput, 10_000, "test", "float32")


def coverage(peers: dict[str, PeerRecord]) -> CoverageMap:
    return CoverageMap("m", BLOCKS, [dict(peers) for _ in range(BLOCKS)])


# --- ranking ------------------------------------------------------------------------------


def test_an_absurd_throughput_buys_no_more_than_a_plausible_device() -> None:
    # the floor makes the liar's 4 blocks cost 4 ms; the honest peer's 250 steps/s cost 4 ms
    peers = coverage({"LIAR": record(LIE), "HONEST": record(250.0)})
    rtt = {"LIAR": 0.0015, "HONEST": 0.001}
    assert find_route(peers, rtt=rtt) == [Hop("LIAR", 0, BLOCKS)]  # unbounded, the lie wins
    assert find_route(peers, rtt=rtt, min_block_seconds=1e-3) == [Hop("HONEST", 0, BLOCKS)]


def test_a_measured_step_time_replaces_the_announced_one() -> None:
    peers = coverage({"CLAIMS_FAST": record(1000.0), "CLAIMS_SLOW": record(100.0)})
    assert find_route(peers) == [Hop("CLAIMS_FAST", 0, BLOCKS)]
    measured = {"CLAIMS_FAST": 0.01, "CLAIMS_SLOW": 0.002}  # seconds per block, as timed
    assert find_route(peers, measured=measured) == [Hop("CLAIMS_SLOW", 0, BLOCKS)]


def test_a_proven_peer_keeps_the_route_unless_an_unproven_one_promises_far_more() -> None:
    reputation = Reputation()
    for _ in range(5):
        reputation.opened("PROVEN")
    assert reputation.failure_chance("NEW") == 0.5
    assert reputation.failure_chance("PROVEN") == pytest.approx(1 / 7)
    premiums = reputation.risk_premiums(["PROVEN", "NEW"], session_tokens=100)
    assert premiums["NEW"] > premiums["PROVEN"]
    slightly_faster = coverage({"PROVEN": record(100.0), "NEW": record(110.0)})
    assert find_route(slightly_faster, premiums=premiums) == [Hop("PROVEN", 0, BLOCKS)]
    far_faster = coverage({"PROVEN": record(10.0), "NEW": record(100.0)})
    assert find_route(far_faster, premiums=premiums) == [Hop("NEW", 0, BLOCKS)]


def test_a_refusal_cools_a_peer_down_doubling_until_it_serves_again(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(reputation_module.time, "monotonic", lambda: now[0])
    reputation = Reputation()
    reputation.failed("P", refused=False)  # a fault: banned elsewhere, no cooldown here
    assert reputation.cooling() == {}
    reputation.failed("P", refused=True)
    assert "P" in reputation.cooling()
    now[0] += reputation_module.COOLDOWN_SECONDS + 1
    assert reputation.cooling() == {}
    reputation.failed("P", refused=True)  # the second refusal in a row: twice as long
    now[0] += reputation_module.COOLDOWN_SECONDS + 1
    assert "P" in reputation.cooling()
    reputation.opened("P")
    assert reputation.cooling() == {}


def test_decode_timings_are_averaged_per_block_without_the_rtt() -> None:
    reputation = Reputation()
    reputation.timed("P", blocks=4, round_trip=0.009, rtt=0.001)
    assert reputation.measured() == {"P": pytest.approx(0.002)}
    reputation.timed("P", blocks=4, round_trip=0.001, rtt=0.002)  # noise below the RTT: zero
    assert 0 < reputation.measured()["P"] < 0.002


def test_the_plausible_floor_grows_with_the_model() -> None:
    tiny = LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)
    large = LlamaConfig(
        hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672
    )
    assert plausible_block_seconds(tiny) == reputation_module.MIN_LAYER_SECONDS
    # a 70B-class layer holds ~0.86e9 weights: ~43 us at 4 bits and 10 TB/s
    assert plausible_block_seconds(large) == pytest.approx(4.3e-5, rel=0.05)


# --- the failover budget, with the real router ----------------------------------------------


class FakeConnection:
    """A swarm of ``peers``; every peer answers pings in 1 ms."""

    def __init__(self, peers: dict[str, PeerRecord]):
        self.map, self.rtt, self.reads = coverage(peers), {}, 0

    def coverage(self, model_id: str, num_blocks: int) -> CoverageMap:
        self.reads += 1
        return self.map

    async def ping_all(self, peer_ids) -> None:
        self.rtt.update(dict.fromkeys(peer_ids, 0.001))


class FakeStream:
    """Opens unless its peer's behaviour says otherwise; a step adds one."""

    behaviour: ClassVar[dict[str, str]] = {}  # peer -> refuse | silent | expire | hang
    opened: ClassVar[list[str]] = []  # every peer a stream was opened to, in order

    def __init__(self, connection, hop: Hop, spec: SessionSpec):
        self.hop, self.spec = hop, spec
        self.last_timing = HopTiming(0.003, 0.0, 0.0, 0.0, 1)
        self.limits = None  # set once open

    async def open(self) -> None:
        self.opened.append(self.hop.peer_id)
        match self.behaviour.get(self.hop.peer_id):
            case "refuse":
                raise HopFailure(self.hop, "busy", fault=False, code=ErrorCode.BUSY)
            case "expire":
                raise HopFailure(self.hop, "expired", fault=False, code=ErrorCode.EXPIRED)
            case "silent":
                raise HopFailure(self.hop, "no reply within 5.0 s")
            case "hang":  # the stream is taken and never answered, until the open timeout
                await asyncio.sleep(self.spec.open_timeout)
                raise HopFailure(self.hop, f"no reply within {self.spec.open_timeout} s")
        self.limits = "open"

    async def step(self, hidden: torch.Tensor, position: int, images=None) -> torch.Tensor:
        return hidden + 1

    async def close(self) -> None:
        pass


@pytest.fixture
def streams(monkeypatch):
    FakeStream.behaviour, FakeStream.opened = {}, []
    monkeypatch.setattr(session_module, "HopStream", FakeStream)
    return FakeStream


def swarm(liars: int, behaviour: str, streams) -> Router:
    """``liars`` peers announcing 1e9 tokens/s beside two honest ones at 50."""
    peers = {f"liar{i:02}": record(LIE) for i in range(liars)}
    peers |= {"honest-a": record(50.0), "honest-b": record(50.0)}
    streams.behaviour = dict.fromkeys((p for p in peers if p.startswith("liar")), behaviour)
    return Router(FakeConnection(peers), "m", BLOCKS, BanList())


def open_session(router: Router, open_timeout: float = 5.0, **options) -> InferenceSession:
    spec = SessionSpec("m", "s", max_length=32, open_timeout=open_timeout)
    session = InferenceSession(router, spec, **options)
    asyncio.run(session.open())
    return session


@pytest.mark.parametrize("behaviour", ["refuse", "silent", "expire"])
def test_thirty_liars_cost_one_attempt_each_and_only_they_are_blamed(streams, behaviour) -> None:
    router = swarm(30, behaviour, streams)
    session = open_session(router)
    assert session.route[0].peer_id.startswith("honest")
    liars = [p for p in streams.opened if p.startswith("liar")]
    assert sorted(liars) == [f"liar{i:02}" for i in range(30)]  # each tried once, all first
    honest = {"honest-a", "honest-b"}
    blamed = router.bans.banned() | set(router.reputation.cooling())
    assert not blamed & honest
    if behaviour == "silent":
        assert router.bans.banned() == set(liars)
    else:  # no fault: not banned (an honest peer can be full), but cooled down
        assert set(router.reputation.cooling()) == set(liars) and not router.bans.banned()
    # the next session goes straight to the proven peer
    streams.opened.clear()
    again = open_session(router)
    assert streams.opened == [session.route[0].peer_id] == [again.route[0].peer_id]
    assert router.connection.reads <= 3  # one read, one fresh read on the first retry


def test_the_budget_is_time_not_a_count_of_attempts(streams) -> None:
    router = swarm(3, "refuse", streams)
    with pytest.raises(SessionFailedError, match=r"no working peer within 0 s \(1 peers failed"):
        open_session(router, failover_timeout=0.0)


def test_a_peer_that_refused_lately_is_still_used_when_nothing_else_serves(streams) -> None:
    router = Router(FakeConnection({"only": record(50.0)}), "m", BLOCKS, BanList())
    router.reputation.failed("only", refused=True)
    assert "only" in router.reputation.cooling()
    assert open_session(router).route == [Hop("only", 0, BLOCKS)]


def test_liars_that_hang_are_hedged_past_not_waited_out_one_by_one(streams, monkeypatch) -> None:
    """Each opening that hangs gets the next route opened beside it after HEDGE_AFTER; the
    honest route wins while earlier liars still hang. Liars that timed out are banned, liars
    still hanging when the honest route opened are cooled down, the honest peers neither."""
    monkeypatch.setattr(session_module, "HEDGE_AFTER", 0.02)
    router = swarm(30, "hang", streams)
    session = open_session(router, open_timeout=0.3)
    assert session.route[0].peer_id.startswith("honest")
    tried = {p for p in streams.opened if p.startswith("liar")}
    assert tried == {f"liar{i:02}" for i in range(30)}
    banned, cooling = router.bans.banned(), set(router.reputation.cooling())
    assert tried == banned | cooling and not (banned | cooling) & {"honest-a", "honest-b"}
    streams.opened.clear()
    assert open_session(router).route == session.route and streams.opened == ["honest-a"]
