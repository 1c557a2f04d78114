"""A peer that answers with a msgpack bomb cannot crash or stall the client.

The session opens on a real peer process whose every step is answered with a 256 MiB msgpack
bomb (``tampering_peer.py bomb``), with an honest replica beside it: the client must refuse the
reply before reading it, blame and ban that peer, fail over to the replica and finish with
transformers' tokens, while its memory stays flat and its event loop keeps ticking.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.framing import RPCStream
from swarmllm.protocol import MessageTooLarge, RemoteError
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

TAMPERING_PEER = Path(__file__).with_name("tampering_peer.py")
PROMPT_LENGTH, NEW_TOKENS = 8, 6
MIB = 1024**2
MEMORY_ALLOWANCE = 96 * MIB  # the bomb is 256 MiB; reading it whole costs at least twice that
HEARTBEAT = 0.01


class _PeakMemory:
    """The process's peak resident memory while in the block, sampled every millisecond or so."""

    def __init__(self) -> None:
        self.baseline = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _heartbeat(gaps: list[float], stop: asyncio.Event) -> None:
    """Tick every ``HEARTBEAT`` seconds on the client's loop; record how late each tick was."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(HEARTBEAT)
        gaps.append(loop.time() - before - HEARTBEAT)


@dataclass
class Outcome:
    bomb: str
    honest: str
    tokens: list[int]
    banned: set[str]
    reasons: dict[str, str]
    memory_growth: int
    worst_tick: float
    ticks: int
    seconds: float


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def outcome(llama: ModelSource, prompt: torch.Tensor, tmp_path_factory) -> Iterator[Outcome]:
    with LocalSwarm(0, source=llama, workdir=tmp_path_factory.mktemp("bomb")) as swarm:
        launcher = [sys.executable, str(TAMPERING_PEER), "bomb"]
        bomb = swarm.start_peer("bomb", (0, 6), launcher=launcher)
        swarm.wait_until_ready(timeout=180)
        with (
            DistributedModelForCausalLM.from_pretrained(
                str(llama.path), initial_peers=swarm.initial_peers
            ) as model,
            model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS) as session,
        ):
            assert [hop.peer_id for hop in session.route] == [bomb.peer_id]
            honest = swarm.start_peer("honest", (0, 6))
            swarm.wait_until_ready(timeout=180)
            loop = model.connection.loop
            gaps: list[float] = []
            stop = asyncio.Event()
            beating = asyncio.run_coroutine_threadsafe(_heartbeat(gaps, stop), loop)
            started = time.perf_counter()
            with _PeakMemory() as memory:
                output = model.generate(
                    prompt, session=session, max_new_tokens=NEW_TOKENS, eos_token_id=[]
                )
            seconds = time.perf_counter() - started
            loop.call_soon_threadsafe(stop.set)
            beating.result(timeout=5)
            reasons = {peer: model.bans.reason(peer) or "" for peer in model.bans.banned()}
            yield Outcome(
                bomb=bomb.peer_id,
                honest=honest.peer_id,
                tokens=output[0].tolist(),
                banned=model.bans.banned(),
                reasons=reasons,
                memory_growth=memory.peak - memory.baseline,
                worst_tick=max(gaps, default=0.0),
                ticks=len(gaps),
                seconds=seconds,
            )


def test_the_bomb_is_refused_and_its_sender_banned(outcome: Outcome, llama, prompt) -> None:
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
    assert outcome.tokens == expected
    assert outcome.banned == {outcome.bomb}
    assert "exceeds the limit" in outcome.reasons[outcome.bomb]


def test_the_client_s_memory_stays_flat_and_its_loop_keeps_ticking(outcome: Outcome) -> None:
    print(
        f"\nbomb of 256 MiB: client memory grew {outcome.memory_growth / MIB:.1f} MiB, "
        f"worst heartbeat delay {outcome.worst_tick * 1e3:.0f} ms over {outcome.ticks} ticks, "
        f"generation with failover {outcome.seconds:.2f} s"
    )
    assert outcome.memory_growth < MEMORY_ALLOWANCE
    assert outcome.ticks > 0
    assert outcome.worst_tick < 1.0  # generous: a busy machine, not a stalled loop


# --- the frame reader on its own ------------------------------------------------------------


class _Sink:
    """A writer that accepts everything (the requests side is not under test here)."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


async def _no_requests():
    return
    yield  # pragma: no cover


def _reader(frames: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(frames)
    reader.feed_eof()
    return reader


def _frame(marker: bytes, body: bytes, claimed: int | None = None) -> bytes:
    length = len(body) if claimed is None else claimed
    return marker + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


def test_a_frame_longer_than_the_limit_is_refused_unread() -> None:
    async def scenario() -> None:
        # a header that claims a terabyte, and no body: read whole, this would wait forever
        reader = _reader(_frame(P2P.MESSAGE_MARKER, b"", claimed=2**40))
        sink = _Sink()
        stream = RPCStream(reader, sink, _no_requests(), "hostile")
        with pytest.raises(MessageTooLarge, match=f"reply of {2**40} bytes exceeds the limit"):
            await asyncio.wait_for(stream.read(1024), 5)
        assert sink.closed

        fine = runtime_pb2.ExpertResponse(metadata=b"\x80").SerializeToString()
        stream = RPCStream(_reader(_frame(P2P.MESSAGE_MARKER, fine)), _Sink(), _no_requests(), "p")
        assert await asyncio.wait_for(stream.read(1024), 5) == fine
        assert await asyncio.wait_for(stream.read(1024), 5) is None  # the peer ended the stream

    asyncio.run(scenario())


def test_an_error_frame_is_a_remote_error_with_its_text_cut() -> None:
    async def scenario() -> None:
        error = RPCError(message="x" * 50_000).SerializeToString()
        stream = RPCStream(_reader(_frame(P2P.ERROR_MARKER, error)), _Sink(), _no_requests(), "p")
        with pytest.raises(RemoteError) as raised:
            await asyncio.wait_for(stream.read(64 * 1024), 5)
        assert len(str(raised.value)) < 1000 and raised.value.peer_id == "p"

    asyncio.run(scenario())
