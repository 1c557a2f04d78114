"""The peer's handlers driven in-process (no P2P): sessions keyed per client and stream, bounded
in time and in each client's share of the cache, and no decoding or signing on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
import threading
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

import swarmllm.peer.servicer as servicer_module
from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.peer.batching import BatchingWorker
from swarmllm.peer.servicer import PeerIdentity, PeerServicer
from swarmllm.peer.sessions import SessionRegistry
from swarmllm.protocol import (
    ErrorCode,
    Forward,
    Open,
    Step,
    unpack_meta,
)
from swarmllm.security.identity import peer_id_of
from swarmllm.security.validation import RequestLimits

REPLY_TIMEOUT = 30.0
CACHE_TOKENS = 256


def _peer_id() -> PeerID:
    return PeerID.from_base58(peer_id_of(Ed25519PrivateKey.generate()))


@dataclass
class Peer:
    servicer: PeerServicer
    model_id: str
    width: int
    local: PeerID

    def context(self, remote: PeerID) -> P2PContext:
        return P2PContext(handle_name="test", local_id=self.local, remote_id=remote)

    def opening(self, stream_id: str | None = None, **changes) -> runtime_pb2.ExpertRequest:
        fields = dict(
            model_id=self.model_id,
            stream_id=stream_id or uuid.uuid4().hex,
            nonce=secrets.token_bytes(16),
            start=0,
            end=self.servicer.span.end,
            max_length=32,
        )
        return Open(**{**fields, **changes}).encode()


@pytest.fixture(scope="module")
def span(llama: ModelSource) -> BlockSpan:
    return BlockSpan.from_weights(llama.config, llama.weight_files(), 0, 3)


def make_peer(span: BlockSpan, llama: ModelSource, **limits) -> Peer:
    limits = replace(RequestLimits(), **limits)
    registry = SessionRegistry(
        CACHE_TOKENS, 32, limits.max_sessions_per_peer, limits.max_cache_tokens_per_peer
    )
    info = dict(
        model_id=llama.model_id,
        start=0,
        end=3,
        version="test",
        torch=torch.__version__,
        dtype="float32",
        device="cpu",
        quant="none",
        decode_steps_per_s=1.0,
        state="ONLINE",
        public_name="",
        adapters=[],
    )
    identity = PeerIdentity(llama.model_id, "test", Ed25519PrivateKey.generate())
    servicer = PeerServicer(span, identity, registry, BatchingWorker(1), limits, info)
    return Peer(servicer, llama.model_id, llama.config.hidden_size, _peer_id())


class Stream:
    """One inference stream from ``client`` into the servicer's handler."""

    def __init__(self, peer: Peer, client: PeerID):
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self.replies = peer.servicer.rpc_inference(self._requests(), peer.context(client))

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def ask(self, request: runtime_pb2.ExpertRequest) -> dict:
        self._outbox.put_nowait(request)
        return await self.next()

    async def next(self, timeout: float = REPLY_TIMEOUT) -> dict:
        reply = await asyncio.wait_for(anext(self.replies), timeout)
        return unpack_meta(reply.metadata)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        with contextlib.suppress(StopAsyncIteration, asyncio.TimeoutError):
            await asyncio.wait_for(anext(self.replies), REPLY_TIMEOUT)


def test_streams_are_keyed_by_client_and_stream_id(span, llama) -> None:
    """Two hops of one client on one peer (a failover onto a peer already in the route), and
    another client using the same stream id, are three separate sessions."""
    peer = make_peer(span, llama)
    alice, mallory = _peer_id(), _peer_id()

    async def scenario() -> list[dict]:
        first, second = Stream(peer, alice), Stream(peer, alice)
        squatter, again = Stream(peer, mallory), Stream(peer, alice)
        replies = [
            await squatter.ask(peer.opening("shared", start=1)),  # pre-opened by another client
            await first.ask(peer.opening("shared", end=1)),
            await second.ask(peer.opening(start=1)),
            await again.ask(peer.opening("shared")),  # the same client reusing its own id
        ]
        for stream in (first, second, squatter, again):
            await stream.close()
        return replies

    squatter, first, second, reused = asyncio.run(scenario())
    assert squatter["kind"] == first["kind"] == second["kind"] == "opened"
    assert reused["code"] == ErrorCode.INVALID and "already open" in reused["message"]


def test_one_client_may_reserve_only_its_share_of_the_cache(span, llama) -> None:
    peer = make_peer(span, llama)  # default share: half of CACHE_TOKENS
    greedy, other = _peer_id(), _peer_id()

    async def scenario() -> list[dict]:
        streams = [Stream(peer, greedy), Stream(peer, greedy), Stream(peer, other)]
        replies = [
            await streams[0].ask(peer.opening(max_length=64, batch=2)),  # 128: the whole share
            await streams[1].ask(peer.opening(max_length=1)),
            await streams[2].ask(peer.opening(max_length=64, batch=2)),
        ]
        for stream in streams:
            await stream.close()
        return replies

    held, refused, served = asyncio.run(scenario())
    assert held["kind"] == "opened" and served["kind"] == "opened"
    assert refused["code"] == ErrorCode.BUSY and "per-peer share" in refused["message"]


@pytest.mark.parametrize("limit", ["idle", "lifetime"])
def test_an_idle_or_old_session_is_closed_by_the_peer_and_its_cache_freed(
    limit, span, llama
) -> None:
    if limit == "idle":
        peer = make_peer(span, llama, session_idle_timeout=0.5)
    else:
        peer = make_peer(span, llama, session_idle_timeout=60.0, max_session_lifetime=1.5)
    client = _peer_id()

    async def scenario() -> tuple[dict, list[dict], weakref.ref]:
        stream = Stream(peer, client)
        assert (await stream.ask(peer.opening()))["kind"] == "opened"
        (session,) = peer.servicer.registry._sessions.values()
        cache = weakref.ref(session.cache)
        del session
        hidden = torch.randn(1, 4, peer.width)
        steps = [await stream.ask(Step(0, 1, (hidden,)).encode())]
        if limit == "lifetime":  # a busy client: steps keep coming, but the session grows old
            for number in range(2, 40):
                await asyncio.sleep(0.1)
                steps.append(await stream.ask(Step(0, number, (hidden,)).encode()))
                if steps[-1]["kind"] != "reply":
                    break
            return steps[-1], steps[:-1], cache
        expired = await stream.next(timeout=10)  # nothing sent: the peer ends the stream
        with pytest.raises(StopAsyncIteration):
            await stream.next(timeout=10)
        return expired, steps, cache

    expired, steps, cache = asyncio.run(scenario())
    assert all(step["kind"] == "reply" for step in steps)
    assert expired["code"] == ErrorCode.EXPIRED, expired
    assert ("no step for" if limit == "idle" else "open longer than") in expired["message"]
    assert peer.servicer.registry.tokens_left == CACHE_TOKENS
    gc.collect()
    assert cache() is None, "the expired session's cache is still referenced"


def test_the_cache_is_allocated_once_at_the_admitted_length(span, llama) -> None:
    peer = make_peer(span, llama)

    async def scenario() -> list[int]:
        stream = Stream(peer, _peer_id())
        await stream.ask(peer.opening(max_length=20, batch=2))
        (session,) = peer.servicer.registry._sessions.values()
        buffers = []
        for number, position in enumerate([0, 5, 6, 7, 8], start=1):
            hidden = torch.randn(2, 5 if position == 0 else 1, peer.width)
            reply = await stream.ask(Step(position, number, (hidden,)).encode())
            assert reply["kind"] == "reply", reply
            buffers += [id(b) for b in session.cache._keys]
            shapes = {tuple(b.shape) for b in session.cache._keys}
            assert {(rows, length) for rows, _, length, _ in shapes} == {(2, 20)}
        await stream.close()
        return buffers

    buffers = asyncio.run(scenario())
    assert len(set(buffers)) == 3  # one buffer per layer, never reallocated


def test_decoding_checking_digests_and_signing_run_off_the_event_loop(
    span, llama, monkeypatch
) -> None:
    peer = make_peer(span, llama)
    seen: dict[str, set[str]] = {}

    def spy(name: str, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(servicer_module, name, wrapped)

    for name in ("unpack_meta", "check_hidden_states", "sign_activation"):
        spy(name, getattr(servicer_module, name))
    client = _peer_id()

    async def scenario() -> str:
        stream = Stream(peer, client)
        await stream.ask(peer.opening())
        reply = await stream.ask(Step(0, 1, (torch.randn(1, 8, peer.width),)).encode())
        assert reply["kind"] == "reply", reply
        await stream.close()
        forward = Forward(
            peer.model_id, b"f" * 16, 0, 3, "float32", (torch.randn(1, 4, peer.width),)
        )

        async def one():
            yield forward.encode()

        answer = await anext(peer.servicer.rpc_forward(one(), peer.context(client)))
        assert unpack_meta(answer.metadata)["kind"] == "reply"
        return threading.current_thread().name

    loop_thread = asyncio.run(scenario())
    assert set(seen) == {"unpack_meta", "check_hidden_states", "sign_activation"}
    for name, threads in seen.items():
        assert loop_thread not in threads, f"{name} ran on the event loop"


def test_stateless_forwards_are_bounded_per_client_and_in_size(span, llama) -> None:
    peer = make_peer(span, llama, max_forward_tokens=16)
    client = _peer_id()

    def forward(rows: int, tokens: int) -> runtime_pb2.ExpertRequest:
        hidden = torch.randn(rows, tokens, peer.width)
        return Forward(peer.model_id, secrets.token_bytes(16), 0, 3, "float32", (hidden,)).encode()

    async def call(request: runtime_pb2.ExpertRequest) -> dict:
        async def one():
            yield request

        reply = await anext(peer.servicer.rpc_forward(one(), peer.context(client)))
        return unpack_meta(reply.metadata)

    async def scenario() -> list[dict]:
        too_big = await call(forward(2, 9))
        # two at once from one client: the second is refused while the first runs
        together = await asyncio.gather(call(forward(1, 16)), call(forward(1, 16)))
        return [too_big, *together]

    too_big, *together = asyncio.run(scenario())
    assert too_big["code"] == ErrorCode.INVALID and "2 x 9 tokens exceeds" in too_big["message"]
    assert sorted(r["kind"] for r in together) == ["error", "reply"]
    (busy,) = [r for r in together if r["kind"] == "error"]
    assert busy["code"] == ErrorCode.BUSY and "stateless forwards" in busy["message"]


def test_a_peer_that_moves_drains_the_sessions_from_before_then_ends_them(span, llama) -> None:
    """After ``move_to`` a session from before goes on with its old layers until its drain
    deadline, then gets EXPIRED (its client reopens elsewhere, blaming no one); new sessions
    open only on the new blocks."""
    peer = make_peer(span, llama)
    moved = BlockSpan.from_weights(llama.config, llama.weight_files(), 3, 6)
    client = _peer_id()
    hidden = torch.randn(1, 4, peer.width)

    async def scenario() -> tuple[list[dict], dict, list[dict]]:
        old = Stream(peer, client)
        assert (await old.ask(peer.opening(end=3)))["kind"] == "opened"
        before = await old.ask(Step(0, 1, (hidden,)).encode())
        info = {**peer.servicer.info, "start": 3, "end": 6}
        assert peer.servicer.move_to(moved, info, None, drain_seconds=1.0) == 1
        during = await old.ask(Step(4, 2, (hidden[:, :1],)).encode())  # the old layers still
        await asyncio.sleep(1.2)
        after = await old.ask(Step(5, 3, (hidden[:, :1],)).encode())
        with pytest.raises(StopAsyncIteration):
            await old.next(timeout=10)
        new, stale = Stream(peer, client), Stream(peer, client)
        openings = [
            await new.ask(peer.opening(start=3, end=6)),
            await stale.ask(peer.opening(start=0, end=3)),
        ]
        await new.close()
        await stale.close()
        return [before, during], after, openings

    served, after, (opened, refused) = asyncio.run(scenario())
    assert [reply["kind"] for reply in served] == ["reply", "reply"]
    assert after["code"] == ErrorCode.EXPIRED and "moved to blocks [3, 6)" in after["message"]
    assert opened["kind"] == "opened"
    assert refused["code"] == ErrorCode.INVALID and "is not served here" in refused["message"]
    assert peer.servicer.registry.tokens_left == CACHE_TOKENS
