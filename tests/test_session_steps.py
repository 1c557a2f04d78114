"""InferenceSession's bookkeeping with stand-in hops: a step is atomic across hops, failover
replays exactly the accepted tokens, and only the peer at fault is banned."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
import torch

import swarmllm.client.session as session_module
from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.bans import BanList
from swarmllm.client.hop import HopFailure, SessionSpec
from swarmllm.client.reputation import Reputation
from swarmllm.client.routing import Hop, NoRouteError
from swarmllm.client.session import InferenceSession, SessionFailedError, SessionRewound
from swarmllm.client.verification import OutvotedHop
from swarmllm.protocol import ErrorCode

WIDTH = 4


class FakeStream:
    """A hop that adds one to its input and records every message it is sent."""

    failures: ClassVar[dict[str, list[HopFailure | None]]] = {}  # peer -> its next steps
    sent: ClassVar[dict[str, list[torch.Tensor]]] = {}

    def __init__(self, connection, hop: Hop, spec: SessionSpec):
        self.hop, self.spec = hop, spec
        self.last_timing = None

    async def open(self) -> None:
        pass

    async def step(self, hidden: torch.Tensor, position: int, images=None) -> torch.Tensor:
        plan = self.failures.get(self.hop.peer_id, [])
        if plan and (failure := plan.pop(0)) is not None:
            raise failure
        self.sent.setdefault(self.hop.peer_id, []).append(hidden)
        return hidden + 1

    async def close(self) -> None:
        pass


class FakeRouter:
    """Routes [0, 2) as two one-block hops, through the first peer per block not avoided."""

    def __init__(self, peers: dict[int, list[str]]):
        self.peers, self.bans, self.num_blocks, self.connection = peers, BanList(), 2, None
        self.reputation = Reputation()
        self.unroutable = 0  # fail this many route() calls
        self.transient = False  # with errors that waiting may cure (every peer left)
        self.fresh_reads: list[bool] = []

    async def route(self, start, end, *, min_cache_tokens, avoid, first_hop_adapter, fresh):
        self.fresh_reads.append(fresh)
        if self.unroutable:
            self.unroutable -= 1
            raise NoRouteError(
                f"blocks {start}-{end - 1}: nobody left", [(start, end)], transient=self.transient
            )
        hops = []
        for block in range(start, end):
            usable = [p for p in self.peers[block] if p not in {*avoid, *self.bans.banned()}]
            hops.append(Hop(usable[0], block, block + 1))
        return hops


@pytest.fixture
def fakes(monkeypatch):
    FakeStream.failures, FakeStream.sent = {}, {}
    monkeypatch.setattr(session_module, "HopStream", FakeStream)
    return FakeStream


def _session(router: FakeRouter, failover_timeout: float = 60.0) -> InferenceSession:
    return InferenceSession(
        router, SessionSpec("m", "s", max_length=64), failover_timeout=failover_timeout
    )


def test_blocks_whose_peers_all_left_are_waited_for_and_read_anew(fakes, monkeypatch) -> None:
    """Hop 1's only peer died and nobody serves block 1 for two reads of the map; then a peer
    moved there. The failover waits for it (reading the map anew each time) and replays."""
    monkeypatch.setattr(session_module, "COVERAGE_POLL", 0.01)
    router = FakeRouter({0: ["a0"], 1: ["a1", "b1"]})
    session = _session(router)

    async def scenario() -> None:
        await session.open()
        await session.step(torch.zeros(1, 3, WIDTH))
        fakes.failures["a1"] = [HopFailure(Hop("a1", 1, 2), "gone")]
        router.unroutable, router.transient = 2, True
        router.fresh_reads.clear()
        await session.step(torch.ones(1, 1, WIDTH))

    asyncio.run(scenario())
    assert router.fresh_reads == [False, True, True]
    assert [hop.peer_id for hop in session.route] == ["a0", "b1"]
    assert session.position == 4


def test_waiting_for_a_lost_span_ends_with_the_failover_budget(fakes, monkeypatch) -> None:
    monkeypatch.setattr(session_module, "COVERAGE_POLL", 0.01)
    router = FakeRouter({0: ["a0"], 1: ["a1"]})
    session = _session(router, failover_timeout=0.2)

    async def scenario() -> None:
        await session.open()
        fakes.failures["a1"] = [HopFailure(Hop("a1", 1, 2), "gone")]
        router.unroutable, router.transient = 10**6, True
        with pytest.raises(NoRouteError, match=r"nobody left; no peer came to serve them within"):
            await session.step(torch.zeros(1, 3, WIDTH))

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    assert len(router.fresh_reads) > 3  # it did read the map again while it waited


def test_a_step_that_fails_half_way_leaves_no_history_and_replay_is_exact(fakes) -> None:
    router = FakeRouter({0: ["a0", "b0"], 1: ["a1", "b1"]})
    session = _session(router)
    prompt, token, retry = (
        torch.zeros(1, 3, WIDTH),
        torch.ones(1, 1, WIDTH),
        torch.ones(1, 1, WIDTH),
    )

    async def scenario() -> None:
        await session.open()
        await session.step(prompt)
        # hop 1 fails, and no replacement can be routed: the step fails after hop 0 took it
        fakes.failures["a1"] = [HopFailure(Hop("a1", 1, 2), "gone")]
        router.unroutable = 1
        with pytest.raises(NoRouteError):
            await session.step(token)
        assert session.position == 3
        assert [t.shape[1] for t in session.history[0]] == [3]  # the half-sent chunk is gone
        await session.step(2 * retry)  # the client retries with another token
        # now hop 0 fails: its replacement must get the prompt and the retried token only
        fakes.failures["a0"] = [HopFailure(Hop("a0", 0, 1), "gone")]
        await session.step(3 * token)

    asyncio.run(scenario())
    replay, step = fakes.sent["b0"]
    torch.testing.assert_close(replay, torch.cat([prompt, 2 * retry], dim=1))
    torch.testing.assert_close(step, 3 * token)
    assert session.position == 5


def test_only_the_faulty_peer_is_banned_and_a_refusal_bans_nobody(fakes) -> None:
    router = FakeRouter({0: ["a0", "b0"], 1: ["a1", "b1", "c1"]})
    session = _session(router)

    async def scenario() -> None:
        await session.open()
        # a0 ended the session the client let idle: opened again on a0 itself, nobody banned
        expired = HopFailure(Hop("a0", 0, 1), "expired", fault=False, code=ErrorCode.EXPIRED)
        fakes.failures["a0"] = [expired]
        await session.step(torch.zeros(1, 1, WIDTH))
        # a1 refuses the request as the client's own fault (INVALID): avoided, not banned
        fakes.failures["a1"] = [HopFailure(Hop("a1", 1, 2), "invalid", fault=False)]
        await session.step(torch.zeros(1, 2, WIDTH), 0)
        # b1 sends a bad output: banned itself, and nobody else
        fakes.failures["b1"] = [HopFailure(Hop("b1", 1, 2), "NaN")]
        await session.step(torch.zeros(1, 1, WIDTH))

    asyncio.run(scenario())
    assert router.bans.banned() == {"b1"}
    assert [hop.peer_id for hop in session.route] == ["a0", "c1"]
    assert all(sent.shape[1] for sent in fakes.sent["b1"])  # no empty replay after the rewind


@pytest.mark.parametrize("holds_images", [False, True], ids=["text", "with-images"])
def test_a_liar_caught_after_its_outputs_went_on_rewinds_the_session_to_the_start(
    fakes, holds_images: bool
) -> None:
    """The hop after it cached what the liar's earlier outputs led to, and the tokens since
    came from them: the session forgets everything and the caller makes the tokens again. A
    session holding images cannot (they went once, with their prompt): the generation fails."""
    router = FakeRouter({0: ["a0", "b0"], 1: ["a1", "b1"]})
    session = _session(router)

    async def scenario() -> None:
        await session.open()
        await session.step(torch.zeros(1, 3, WIDTH))
        await session.step(torch.ones(1, 1, WIDTH))
        if holds_images:
            session.images = ImageInputs(torch.zeros(1, 2, WIDTH), torch.tensor([[1, 2]]))
        fakes.failures["a1"] = [OutvotedHop(Hop("a1", 1, 2), "its output disagrees")]
        if holds_images:
            with pytest.raises(SessionFailedError, match="holds images"):
                await session.step(torch.ones(1, 1, WIDTH))
            return
        with pytest.raises(SessionRewound) as rewound:
            await session.step(torch.ones(1, 1, WIDTH))
        assert rewound.value.position == session.position == 0
        assert session.history == [[], []] and session.outputs == [[], []]
        await session.step(torch.zeros(1, 3, WIDTH))  # made again, through the replacement
        assert session.position == 3

    asyncio.run(scenario())
    assert router.bans.banned() == {"a1"}
    assert [hop.peer_id for hop in session.route] == ["a0", "b1"]
