"""Malformed requests over real P2P: each gets an error naming the problem, nobody else suffers.

One peer serves the whole tiny model with small request limits. While the table runs, another
client's session keeps decoding on the same peer; at the end its outputs must equal a local run
of the same blocks, and the peer's log must hold no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.hop import HopStream, SessionSpec
from swarmllm.client.routing import Hop
from swarmllm.protocol import ErrorCode, Forward, Open, Step, unpack_meta
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

MAX_TOKENS, MAX_LENGTH, MAX_BYTES, MAX_SESSIONS = 16, 64, 65536, 2
LIMITS = [
    f"--max-tokens-per-message={MAX_TOKENS}",
    f"--max-session-length={MAX_LENGTH}",
    f"--max-message-bytes={MAX_BYTES}",
    f"--max-sessions-per-peer={MAX_SESSIONS}",
]
REPLY_TIMEOUT = 20.0
HONEST_PROMPT, HONEST_STEPS = 8, 24
MAX_HONEST_STEPS = 5000  # bounds the honest loop should the test never stop it

Reply = tuple[dict[str, Any], list[torch.Tensor]]


@dataclass
class Target:
    """What a malformed request is aimed at."""

    connection: SwarmConnection
    peer_id: str
    model_id: str
    width: int  # the model's hidden size
    num_blocks: int

    def opening(self, **changes: Any) -> runtime_pb2.ExpertRequest:
        """An ``Open`` with ``changes`` written into its metadata as they are (any type)."""
        request = Open(
            self.model_id, uuid.uuid4().hex, secrets.token_bytes(16), 0, self.num_blocks, 32
        ).encode()
        return _changed(request, changes)

    def forward(self, hidden: torch.Tensor, **changes: Any) -> runtime_pb2.ExpertRequest:
        request = Forward(
            self.model_id, secrets.token_bytes(16), 0, self.num_blocks, "float32", (hidden,)
        ).encode()
        return _changed(request, changes)

    def hidden(self, tokens: int, rows: int = 1, width: int | None = None) -> torch.Tensor:
        return torch.randn(rows, tokens, width or self.width)


def _changed(request: runtime_pb2.ExpertRequest, changes: dict[str, Any]):
    meta = {**msgpack.unpackb(request.metadata), **changes}
    request.metadata = msgpack.packb(meta, use_bin_type=True)
    return request


def step(position: int, number: int, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return Step(position, number, tensors).encode()


def _nested_model_id(target: Target, depth: int) -> runtime_pb2.ExpertRequest:
    """An opening whose model id is a list nested ``depth`` deep (msgpack's own packer refuses
    to write one, so it is spliced in by hand)."""
    request = target.opening(model_id="@@")
    nested = b"\x91" * depth + msgpack.packb("x")
    request.metadata = request.metadata.replace(msgpack.packb("@@"), nested)
    return request


class RawStream:
    """An inference stream that sends exactly the requests it is given, one reply at a time."""

    def __init__(self, connection: SwarmConnection, peer_id: str):
        self.connection, self.peer_id = connection, peer_id
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None

    async def ask(self, request: runtime_pb2.ExpertRequest) -> Reply | None:
        """The reply to ``request``; None when the peer ended the stream instead."""
        self._outbox.put_nowait(request)
        if self._replies is None:
            stub = self.connection.stub(self.peer_id)
            self._replies = await asyncio.wait_for(
                stub.rpc_inference(self._requests()), REPLY_TIMEOUT
            )
        try:
            reply = await asyncio.wait_for(anext(self._replies), REPLY_TIMEOUT)
        except StopAsyncIteration:
            return None
        return _decoded(reply)

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._replies is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._replies.aclose(), 2.0)


async def on_one_stream(target: Target, *requests: runtime_pb2.ExpertRequest) -> Reply:
    """Send ``requests`` on one stream; every reply but the last must be a success."""
    stream = RawStream(target.connection, target.peer_id)
    try:
        for index, request in enumerate(requests):
            reply = await stream.ask(request)
            assert reply is not None, f"the peer closed the stream at request {index}"
            if index < len(requests) - 1:
                assert reply[0]["kind"] != "error", f"request {index} failed: {reply[0]}"
        return reply
    finally:
        await stream.close()


async def forward_call(target: Target, request: runtime_pb2.ExpertRequest) -> Reply:
    stub = target.connection.stub(target.peer_id)

    async def single() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield request

    replies = await asyncio.wait_for(stub.rpc_forward(single()), REPLY_TIMEOUT)
    reply = await asyncio.wait_for(anext(replies), REPLY_TIMEOUT)
    return _decoded(reply)


def _decoded(reply: runtime_pb2.ExpertResponse) -> Reply:
    return unpack_meta(reply.metadata), [deserialize_torch_tensor(t) for t in reply.tensors]


async def open_many(target: Target, stream_ids: list[str]) -> Reply:
    """Open one stream per stream id, keeping all open; return the last opening's reply."""
    streams = [RawStream(target.connection, target.peer_id) for _ in stream_ids]
    try:
        for stream, stream_id in zip(streams, stream_ids, strict=True):
            reply = await stream.ask(target.opening(stream_id=stream_id))
            assert reply is not None
        return reply
    finally:
        await asyncio.gather(*(stream.close() for stream in streams))


def _with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t[0, 1, 3] = value
    return t


Scenario = Callable[[Target], Awaitable[Reply]]

# name -> (scenario, words the error must contain[, the reply code if not INVALID])
CASES: dict[str, tuple[Scenario, tuple[str, ...]] | tuple[Scenario, tuple[str, ...], str]] = {
    "metadata is not msgpack": (
        lambda t: on_one_stream(t, runtime_pb2.ExpertRequest(metadata=b"\xc1\x00")),
        ("not valid msgpack",),
    ),
    "metadata is not a map": (
        lambda t: on_one_stream(t, runtime_pb2.ExpertRequest(metadata=msgpack.packb([1, 2]))),
        ("must be a map",),
    ),
    "a step before opening (unknown session)": (
        lambda t: on_one_stream(t, step(0, 1, t.hidden(4))),
        ("unknown session",),
    ),
    "wrong model id": (
        lambda t: on_one_stream(t, t.opening(model_id="someone/else")),
        ("'someone/else' is not served here",),
    ),
    "span not served": (
        lambda t: on_one_stream(t, t.opening(end=t.num_blocks + 3)),
        ("span [0, 9)", "is not served here"),
    ),
    "unsupported wire dtype": (
        lambda t: on_one_stream(t, t.opening(wire_dtype="int8")),
        ("unsupported wire dtype 'int8'",),
    ),
    "negative pad length": (
        lambda t: on_one_stream(t, t.opening(pad_lengths=[-1])),
        ("'pad_lengths'", "non-negative"),
    ),
    "pad lengths for another batch size": (
        lambda t: on_one_stream(t, t.opening(pad_lengths=[0, 0])),
        ("'pad_lengths' has 2 entries for a batch of 1",),
    ),
    "session longer than the peer allows": (
        lambda t: on_one_stream(t, t.opening(max_length=MAX_LENGTH + 1)),
        (f"'max_length' = {MAX_LENGTH + 1} is outside [1, {MAX_LENGTH}]",),
    ),
    "max length that is not an integer": (
        lambda t: on_one_stream(t, t.opening(max_length="lots")),
        ("'max_length' must be an integer",),
    ),
    "empty stream id": (
        lambda t: on_one_stream(t, t.opening(stream_id="")),
        ("'stream_id' must be a non-empty string",),
    ),
    "a client of protocol 1": (
        lambda t: on_one_stream(
            t, runtime_pb2.ExpertRequest(metadata=msgpack.packb({"open": {"model_id": "x"}}))
        ),
        ("speaks swarmllm protocol 1", "upgrade the client"),
        ErrorCode.VERSION,
    ),
    "a client of a later major version": (
        lambda t: on_one_stream(t, t.opening(protocol=[3, 1])),
        ("speaks swarmllm protocol 3.1",),
        ErrorCode.VERSION,
    ),
    "pad length of 2**64 - 1": (
        lambda t: on_one_stream(t, t.opening(pad_lengths=[2**64 - 1])),
        ("'pad_lengths' must be a list", "non-negative integers"),
    ),
    "pad length as long as the session": (
        lambda t: on_one_stream(t, t.opening(pad_lengths=[32])),
        ("'pad_lengths' must be non-negative and below 32",),
    ),
    "model id nested 1000 deep": (
        lambda t: on_one_stream(t, _nested_model_id(t, 1000)),
        ("'model_id' must be a non-empty string", "got [[[...]]]"),
    ),
    "a model id of 50,000 chars is not echoed whole": (
        lambda t: on_one_stream(t, t.opening(model_id="m" * 50_000)),
        ("'model_id' must be a non-empty string", "'mmmm"),
    ),
    "metadata that decodes to a huge list": (
        lambda t: on_one_stream(t, t.opening(junk=list(range(MAX_BYTES)))),
        ("exceeds the limit of",),
    ),
    "a nonce too short to be unique": (
        lambda t: on_one_stream(t, t.opening(nonce=b"1")),
        ("'nonce' must be 16-64 bytes",),
    ),
    "wrong hidden size": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(4, width=t.width // 2))),
        ("hidden size 32 does not match the model's 64",),
    ),
    "wrong dtype": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(4).half())),
        ("dtype torch.float16", "uses torch.float32"),
    ),
    "NaN": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, _with_value(t.hidden(4), torch.nan))),
        ("NaN or Inf",),
    ),
    "Inf": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, _with_value(t.hidden(4), torch.inf))),
        ("NaN or Inf",),
    ),
    "empty tensor": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(0))),
        ("empty",),
    ),
    "wrong rank": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, torch.randn(4, t.width))),
        ("rank 3",),
    ),
    "batch other than the session's": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(4, rows=2))),
        ("batch of 2 rows does not match the session's 1",),
    ),
    "no hidden states": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1)),
        ("no hidden states",),
    ),
    "undecodable tensor bytes": (
        lambda t: on_one_stream(
            t,
            t.opening(),
            runtime_pb2.ExpertRequest(
                metadata=msgpack.packb({"kind": "step", "position": 0, "step": 1}),
                tensors=[runtime_pb2.Tensor(buffer=b"junk", size=[1, 4, 64], dtype="float32")],
            ),
        ),
        ("malformed tensor",),
    ),
    "too many tokens in one message": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(MAX_TOKENS + 1))),
        (f"{MAX_TOKENS + 1} tokens in one message exceed the limit of {MAX_TOKENS}",),
    ),
    "oversized message": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(300))),
        (f"exceeds the limit of {MAX_BYTES} bytes",),
    ),
    "length beyond the session's max": (
        lambda t: on_one_stream(
            t, t.opening(max_length=8), step(0, 1, t.hidden(6)), step(6, 2, t.hidden(4))
        ),
        ("exceeds the session's max length 8",),
    ),
    "out-of-order step": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(4)), step(4, 1, t.hidden(1))),
        ("out-of-order step 1",),
    ),
    "position gap": (
        lambda t: on_one_stream(t, t.opening(), step(0, 1, t.hidden(4)), step(9, 2, t.hidden(1))),
        ("position 9 leaves a gap", "holds 4 tokens"),
    ),
    "stream id already open (by this client)": (
        lambda t: open_many(t, ["same-id", "same-id"]),
        ("stream 'same-id' of this client is already open",),
    ),
    "forward: NaN": (
        lambda t: forward_call(t, t.forward(_with_value(t.hidden(4), torch.nan))),
        ("NaN or Inf",),
    ),
    "forward: pad lengths for another batch size": (
        lambda t: forward_call(t, t.forward(t.hidden(4), pad_lengths=[1, 0])),
        ("'pad_lengths' has 2 entries for a batch of 1",),
    ),
    "forward: span not served": (
        lambda t: forward_call(t, t.forward(t.hidden(4), start=2, end=2)),
        ("span [2, 2) is not served here",),
    ),
}


@pytest.fixture(scope="module")
def swarm(llama: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(
        1, source=llama, workdir=tmp_path_factory.mktemp("malformed"), peer_args=LIMITS
    ) as running:
        running.wait_until_ready(timeout=120)
        yield running


@pytest.fixture(scope="module")
def target(swarm: LocalSwarm, llama: ModelSource) -> Iterator[Target]:
    with SwarmConnection(swarm.initial_peers) as connection:
        yield Target(
            connection,
            swarm.peers[0].peer_id,
            llama.model_id,
            llama.config.hidden_size,
            llama.config.num_hidden_layers,
        )


@dataclass
class HonestRun:
    inputs: list[torch.Tensor]  # the prompt, then one token per decode step
    outputs: Future  # list[(index into inputs, output)] once the session is over
    stop: threading.Event


@pytest.fixture(scope="module")
def honest(swarm: LocalSwarm, llama: ModelSource) -> Iterator[HonestRun]:
    """Another client's session, decoding on the same peer while the table runs."""
    width = llama.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, HONEST_PROMPT, width, generator=generator)]
    inputs += [torch.randn(1, 1, width, generator=generator) for _ in range(HONEST_STEPS)]
    stop = threading.Event()
    hop = Hop(swarm.peers[0].peer_id, 0, llama.config.num_hidden_layers)
    spec = SessionSpec(llama.model_id, "honest", max_length=HONEST_PROMPT + HONEST_STEPS)

    async def decode(connection: SwarmConnection) -> list[tuple[int, torch.Tensor]]:
        """Prefill, then decode; at the end rewind to the prompt and decode again, until
        stopped (the same inputs always give the same outputs)."""
        stream = HopStream(connection, hop, spec)
        await stream.open()
        try:
            outputs = [(0, await stream.step(inputs[0], 0))]
            for count in range(MAX_HONEST_STEPS):
                index = 1 + count % HONEST_STEPS
                position = HONEST_PROMPT + index - 1
                outputs.append((index, await stream.step(inputs[index], position)))
                if stop.is_set():
                    break
                await asyncio.sleep(0.02)
            return outputs
        finally:
            await stream.close()

    with SwarmConnection(swarm.initial_peers) as connection:
        future = asyncio.run_coroutine_threadsafe(decode(connection), connection.loop)
        run = HonestRun(inputs, future, stop)
        yield run
        stop.set()
        with contextlib.suppress(Exception):
            run.outputs.result(timeout=60)


@pytest.mark.parametrize("name", list(CASES))
def test_a_malformed_request_gets_an_error_naming_the_problem(name, target, honest) -> None:
    scenario, words, *code = CASES[name]
    meta, tensors = target.connection.run(scenario(target), timeout=60)
    assert meta.get("kind") == "error", meta
    assert meta.get("code") == (code[0] if code else ErrorCode.INVALID), meta
    for word in words:
        assert word in meta["message"], meta["message"]
    assert len(meta["message"]) < 600  # echoed values are shortened
    assert not tensors


def test_too_many_sessions_from_one_client_are_refused_as_busy(swarm, target, honest) -> None:
    # a client of its own, so the sessions it holds cannot disturb the table above
    with SwarmConnection(swarm.initial_peers) as connection:
        own = Target(connection, target.peer_id, target.model_id, target.width, target.num_blocks)
        ids = [uuid.uuid4().hex for _ in range(MAX_SESSIONS + 1)]
        meta, _ = connection.run(open_many(own, ids), timeout=60)
    assert meta.get("code") == ErrorCode.BUSY, meta
    assert f"already holds {MAX_SESSIONS} sessions (the per-peer limit)" in meta["message"]


def test_a_stream_keeps_serving_after_a_refused_step(target, honest) -> None:
    good = target.hidden(4)
    nan = _with_value(target.hidden(4), torch.nan)

    async def scenario() -> list[Reply | None]:
        stream = RawStream(target.connection, target.peer_id)
        try:
            return [
                await stream.ask(target.opening()),
                await stream.ask(step(0, 1, nan)),
                await stream.ask(step(0, 2, good)),
            ]
        finally:
            await stream.close()

    opened, refused, served = target.connection.run(scenario(), timeout=60)
    assert opened[0]["kind"] == "opened" and "NaN" in refused[0]["message"]
    assert served[0]["kind"] == "reply" and served[0]["step"] == 2
    assert served[1][0].shape == good.shape


def test_the_concurrent_session_finished_with_correct_outputs(
    swarm, honest: HonestRun, llama: ModelSource
) -> None:
    time.sleep(0.5)  # let the honest session overlap the whole table, then end it
    honest.stop.set()
    outputs = honest.outputs.result(timeout=120)
    assert len(outputs) > HONEST_STEPS  # it decoded through the table and rewound at least once
    local = BlockSpan.from_weights(
        llama.config, llama.weight_files(), 0, llama.config.num_hidden_layers
    )
    cache = local.new_cache()
    expected = [local(hidden, cache) for hidden in honest.inputs]
    for index, output in outputs:
        torch.testing.assert_close(output, expected[index], atol=1e-5, rtol=0)
    log = swarm.peers[0].log_tail(lines=10_000)
    assert "Traceback" not in log and "Handler failed" not in log
    assert "refused a request" in log


def test_a_prompt_longer_than_one_message_is_sent_in_chunks_and_matches_transformers(
    swarm, llama: ModelSource, honest
) -> None:
    """The peer takes MAX_TOKENS tokens a message: a 40-token prompt goes as chunks of 16, 16
    and 8, the later ones after a non-empty cache (an explicit causal mask offset by the past
    length). Logits and greedy tokens equal transformers'; nobody is banned."""
    from transformers import AutoModelForCausalLM

    from swarmllm.client.model import DistributedModelForCausalLM

    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(11))
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    with torch.inference_mode():
        want_logits = reference(prompt).logits
    want_tokens = reference.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    with DistributedModelForCausalLM.from_pretrained(
        str(llama.path), initial_peers=swarm.initial_peers
    ) as model:
        logits = model.forward(prompt)
        with model.inference_session(max_length=MAX_LENGTH) as session:
            tokens = model.generate(prompt, session=session, max_new_tokens=8, eos_token_id=[])
        banned = model.bans.banned()
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    assert tokens[0].tolist() == want_tokens
    assert not banned
