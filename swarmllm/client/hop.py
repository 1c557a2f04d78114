"""One open inference stream to one peer, for one sub-span, with every reply verified.

Every stream has its own id and nonce (so does every replacement after a failover): a peer keys
its session by (this client, stream id), and every signature of the stream covers the nonce. The
client checks each reply itself (signature, shape, dtype, finite values), so a bad output is
blamed on the peer that sent it, never on the next hop that would refuse it. A step longer than
the peer's announced per-message limits is sent in chunks that fit them.

No reply may be longer than the reply the client expects (the output has the shape of what was
sent): a longer frame is refused before it is read, and every reply is decoded and checked on
the connection's codec threads, never on its event loop. Either way a peer that sends garbage
fails its hop, and the session bans it and fails over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.profile import HopTiming
from swarmllm.client.routing import Hop
from swarmllm.framing import RPCStream
from swarmllm.protocol import (
    CLOSE,
    MAX_METADATA_BYTES,
    ErrorCode,
    Forward,
    MalformedMessage,
    Open,
    Opened,
    RemoteError,
    Reply,
    Step,
    decode_reply,
)
from swarmllm.security.signing import (
    ActivationDigest,
    MessageKind,
    SignatureError,
    verify_activation,
)

logger = logging.getLogger("swarmllm.client")

# Error codes that say nothing bad about the peer: it is busy, refuses a request the client got
# wrong, speaks another version, or closed a session the client let idle. The client routes
# around it for the session and never bans it for these.
NOT_A_FAULT = frozenset({ErrorCode.BUSY, ErrorCode.INVALID, ErrorCode.VERSION, ErrorCode.EXPIRED})
NONCE_BYTES = 16
MESSAGE_OVERHEAD = 4096  # bytes of a message besides its tensors' data, when chunking
OPENED_MAX_BYTES = MAX_METADATA_BYTES + MESSAGE_OVERHEAD  # the longest reply without tensors


def reply_max_bytes(sent: torch.Tensor) -> int:
    """The longest reply to ``sent``: an output of its shape and dtype, and metadata."""
    # hivemind sends bfloat16 as float32 unless its USE_LEGACY_BFLOAT16 is 0
    per_value = 4 if sent.dtype == torch.bfloat16 else sent.element_size()
    return OPENED_MAX_BYTES + sent.numel() * per_value


class HopFailure(RuntimeError):
    """A hop could not serve a step; ``fault`` is False for a healthy peer (busy, or refusing
    what the client itself got wrong)."""

    def __init__(self, hop: Hop, reason: str, *, fault: bool = True, code: str | None = None):
        super().__init__(f"peer {hop.peer_id} (blocks {hop.start}-{hop.end - 1}): {reason}")
        self.hop, self.reason, self.fault = hop, reason, fault
        self.code = code  # the peer's error code, for an error reply


@dataclass(frozen=True)
class SessionSpec:
    """What every hop of one inference session is opened with."""

    model_id: str
    session_id: str  # the client's name for the session (logs, evidence); never sent
    max_length: int
    batch: int = 1
    pad_lengths: tuple[int, ...] | None = None
    wire_dtype: str = "float32"
    step_timeout: float = 10.0  # seconds for one step, plus TOKEN_TIMEOUT per token sent
    # seconds for a stream to open (at most step_timeout): an honest peer opens in
    # milliseconds, and a peer that takes the stream and never answers must cost little
    open_timeout: float = 5.0
    verify_signatures: bool = True

    def timeout_for(self, num_tokens: int) -> float:
        return self.step_timeout + TOKEN_TIMEOUT * num_tokens * self.batch


TOKEN_TIMEOUT = 0.05
PROBE_AFTER = 0.5  # seconds a reply may be late before the client checks the peer still answers
PROBE_TIMEOUT = 2.0  # seconds for that check


@dataclass(frozen=True)
class SignedReply:
    """A peer's output with the digest it signed and its signature: evidence a third party
    can check with the peer id alone."""

    peer_id: str
    digest: ActivationDigest
    signature: bytes | None  # None only when the reply carried none and nobody checked
    output: torch.Tensor


class HopStream:
    def __init__(self, connection: SwarmConnection, hop: Hop, spec: SessionSpec):
        self.connection, self.hop, self.spec = connection, hop, spec
        self.stream_id = uuid.uuid4().hex
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._replies: RPCStream | None = None
        self._step = 0
        self.limits: Opened | None = None  # the peer's per-message limits, from its opening
        self.last_timing: HopTiming | None = None  # of the latest step, for profiles
        self.last_replies: list[SignedReply] = []  # the latest step's, one per chunk (evidence)

    async def open(self) -> None:
        opening = Open(
            model_id=self.spec.model_id,
            stream_id=self.stream_id,
            nonce=self.nonce,
            start=self.hop.start,
            end=self.hop.end,
            max_length=self.spec.max_length,
            batch=self.spec.batch,
            pad_lengths=self.spec.pad_lengths,
            wire_dtype=self.spec.wire_dtype,
        )
        self._outbox.put_nowait(opening.encode())
        timeout = min(self.spec.open_timeout, self.spec.step_timeout)
        try:
            self._replies = await asyncio.wait_for(
                self.connection.open_stream(self.hop.peer_id, "rpc_inference", self._requests()),
                timeout,
            )
        except Exception as e:
            raise HopFailure(self.hop, f"cannot open a stream: {e or type(e).__name__}") from e
        raw = await self._receive(timeout, OPENED_MAX_BYTES)
        self.limits = await self.connection.off_loop(decode_for, self.hop, raw, Opened)

    async def step(
        self, hidden: torch.Tensor, position: int, images: ImageInputs | None = None
    ) -> torch.Tensor:
        """Send new hidden states starting at ``position`` (with image features for the
        adapter of a first hop), in as many messages as the peer's limits need; return the
        verified output."""
        sent = time.perf_counter()
        outputs, replies, timings = [], [], []
        chunks = self._chunks(hidden, position, images)
        for begin, end in chunks:
            chunk = hidden[:, begin - position : end - position]
            chunk_images = images if len(chunks) == 1 else _images_in(images, begin, end)
            reply, timing = await self._step_chunk(chunk, begin, chunk_images)
            outputs.append(reply.output)
            replies.append(reply)
            timings.append(timing)
        self.last_replies = replies
        self.last_timing = HopTiming(
            time.perf_counter() - sent,
            sum(t["compute_ms"] for t in timings) / 1e3,
            sum(t["queue_ms"] for t in timings) / 1e3,
            sum(t["peer_ms"] for t in timings) / 1e3,
            max(1, int(max(t["batch"] for t in timings))),
        )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _chunks(
        self, hidden: torch.Tensor, position: int, images: ImageInputs | None
    ) -> list[tuple[int, int]]:
        """Token ranges ``[begin, end)`` of the messages that carry ``hidden``: each within
        the peer's token and byte limits, none splitting an image's placeholders."""
        assert self.limits is not None, "open the stream first"
        rows, tokens, width = hidden.shape
        per_token = rows * width * hidden.element_size()
        budget = self.limits.max_bytes - MESSAGE_OVERHEAD
        if images is not None:  # the worst case: every image in one message
            budget -= sum(t.numel() * t.element_size() for t in images.tensors())
        fit = max(1, budget // per_token)
        size = max(1, min(self.limits.max_tokens, fit))
        if tokens <= size:
            return [(position, position + tokens)]  # one message, images as they are
        if images is not None:
            _check_images_inside(images, position, position + tokens)
        chunks, begin, stop = [], position, position + tokens
        while begin < stop:
            end = min(begin + size, stop)
            if images is not None and end < stop:
                straddling = images.positions[
                    (images.positions.min(dim=1).values < end)
                    & (images.positions.max(dim=1).values >= end)
                ]
                if straddling.numel():
                    end = int(straddling.min())
                    if end <= begin:
                        raise ValueError(
                            f"an image of {images.positions.shape[1]} tokens does not fit the "
                            f"{size} tokens peer {self.hop.peer_id} takes in one message"
                        )
            chunks.append((begin, end))
            begin = end
        return chunks

    async def _step_chunk(
        self, hidden: torch.Tensor, position: int, images: ImageInputs | None
    ) -> tuple[SignedReply, dict[str, float]]:
        self._step += 1
        tensors = _sent_tensors(hidden, images)
        self._outbox.put_nowait(Step(position, self._step, tuple(tensors)).encode())
        timeout = self.spec.timeout_for(hidden.shape[1])
        raw = await self._receive(timeout, reply_max_bytes(hidden))
        return await self.connection.off_loop(self._accept, raw, hidden, position, images)

    def _accept(
        self, raw: bytes, hidden: torch.Tensor, position: int, images: ImageInputs | None
    ) -> tuple[SignedReply, dict[str, float]]:
        """(codec thread) The reply to the latest step, decoded, checked and verified."""
        reply: Reply = decode_for(self.hop, raw, Reply)
        if reply.position != position or reply.step != self._step:
            raise HopFailure(
                self.hop,
                f"reply to step {reply.step} at position {reply.position} does not match "
                f"step {self._step} at position {position}",
            )
        check_output(self.hop, hidden, reply.output)
        digest = self.digest(position, self._step, hidden, reply.output, images)
        if self.spec.verify_signatures:
            verify_reply(self.hop, digest, reply.signature)
        signed = SignedReply(self.hop.peer_id, digest, reply.signature or None, reply.output)
        return signed, dict(reply.timing)

    @property
    def steps_sent(self) -> int:
        """The step number of the latest message (steps count from 1)."""
        return self._step

    def digest(
        self,
        position: int,
        step: int,
        hidden: torch.Tensor,
        output: torch.Tensor,
        images: ImageInputs | None = None,
    ) -> ActivationDigest:
        """What the peer must have signed for ``output`` of step ``step`` of this stream: the
        input digest covers every tensor sent, image features and positions included."""
        return ActivationDigest.of(
            MessageKind.INFERENCE,
            self.spec.model_id,
            self.stream_id,
            self.nonce,
            position,
            step,
            self.hop.start,
            self.hop.end,
            self.spec.pad_lengths,
            _sent_tensors(hidden, images),
            output,
        )

    async def _receive(self, timeout: float, max_bytes: int) -> bytes:
        """The next reply's bytes (at most ``max_bytes``). While it is late, ping the peer
        every ``PROBE_AFTER`` seconds: a dead peer's stream does not always drop, and a failed
        ping fails the hop at once instead of at the timeout."""
        assert self._replies is not None
        reply = asyncio.ensure_future(read_frame(self._replies, self.hop, timeout, max_bytes))
        try:
            while True:
                done, _ = await asyncio.wait({reply}, timeout=PROBE_AFTER)
                if done:
                    return reply.result()
                probe = asyncio.ensure_future(
                    self.connection.info(self.hop.peer_id, timeout=PROBE_TIMEOUT)
                )
                done, _ = await asyncio.wait({reply, probe}, return_when=asyncio.FIRST_COMPLETED)
                if reply in done:
                    probe.cancel()
                    return reply.result()
                if (error := probe.exception()) is not None:
                    raise HopFailure(
                        self.hop,
                        f"no reply, and no answer to a ping: {error or type(error).__name__}",
                    )
        finally:
            reply.cancel()  # only a read still pending: the stream is given up

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def close(self) -> None:
        """End the session on the peer (an empty message), then the stream itself."""
        self._outbox.put_nowait(CLOSE)
        self._outbox.put_nowait(None)
        if self._replies is not None:
            with contextlib.suppress(Exception):
                await self._replies.aclose()


async def read_frame(stream: RPCStream, hop: Hop, timeout: float, max_bytes: int) -> bytes:
    """The next reply frame of a stream, at most ``max_bytes`` long; every way it can fail
    becomes a ``HopFailure``."""
    try:
        raw = await asyncio.wait_for(stream.read(max_bytes), timeout)
    except asyncio.TimeoutError:
        raise HopFailure(hop, f"no reply within {timeout:.1f} s") from None
    except RemoteError as e:
        raise HopFailure(hop, f"error reply: {e.reason}") from e
    except MalformedMessage as e:
        raise HopFailure(hop, f"malformed reply: {e}") from e
    except Exception as e:
        raise HopFailure(hop, f"stream failed: {e or type(e).__name__}") from e
    if raw is None:
        raise HopFailure(hop, "the peer closed the stream")
    return raw


def decode_for(hop: Hop, raw: bytes, expected: type[Reply | Opened]) -> Any:
    """A reply frame's bytes decoded as ``expected`` (a codec thread's job); every way it can
    fail becomes a ``HopFailure`` (not the peer's fault for the codes in ``NOT_A_FAULT``)."""
    try:
        reply = runtime_pb2.ExpertResponse.FromString(raw)
    except Exception as e:  # protobuf's DecodeError, among others
        raise HopFailure(hop, f"malformed reply: not a message ({e})") from e
    try:
        return decode_reply(reply, expected)
    except RemoteError as e:
        fault = e.code not in NOT_A_FAULT
        if not fault:
            logger.warning("peer %s refused (%s): %s", hop.peer_id, e.code, e.reason)
        reason = f"error reply ({e.code}): {e.reason}"
        raise HopFailure(hop, reason, fault=fault, code=e.code) from e
    except MalformedMessage as e:
        raise HopFailure(hop, f"malformed reply: {e}") from e


def check_output(hop: Hop, hidden: torch.Tensor, output: torch.Tensor) -> None:
    """The hop's output must have its input's shape and dtype and finite values: a reply that
    does not is the sending peer's fault."""
    if output.shape != hidden.shape or output.dtype != hidden.dtype:
        raise HopFailure(
            hop,
            f"reply has shape {list(output.shape)} {output.dtype}, "
            f"expected {list(hidden.shape)} {hidden.dtype}",
        )
    if not torch.isfinite(output).all():
        raise HopFailure(hop, "reply contains NaN or Inf values")


def verify_reply(hop: Hop, signed: ActivationDigest, signature: bytes) -> None:
    """Check the hop's signature over ``signed``; log the evidence and fail the hop if bad."""
    try:
        if not signature:
            raise SignatureError(f"reply from {hop.peer_id} carries no signature", hop.peer_id, 0)
        verify_activation(hop.peer_id, signed, signature)
    except SignatureError as e:
        logger.error(
            "bad signature from %s at step %d (input %s, output %s): %s",
            hop.peer_id,
            signed.step,
            signed.input_digest.hex()[:16],
            signed.output_digest.hex()[:16],
            e,
        )
        raise HopFailure(hop, f"invalid signature: {e}") from e


async def remote_forward(
    connection: SwarmConnection,
    hop: Hop,
    model_id: str,
    hidden: torch.Tensor,
    *,
    timeout: float = 30.0,
    verify_signatures: bool = True,
) -> torch.Tensor:
    """Stateless run of whole sequences through ``hop`` (the ``forward`` RPC), verified."""
    reply = await signed_forward(
        connection, hop, model_id, hidden, timeout=timeout, verify_signatures=verify_signatures
    )
    return reply.output


async def signed_forward(
    connection: SwarmConnection,
    hop: Hop,
    model_id: str,
    hidden: torch.Tensor,
    *,
    pad_lengths: tuple[int, ...] | None = None,
    timeout: float = 30.0,
    verify_signatures: bool = True,
) -> SignedReply:
    """``remote_forward`` returning the signed reply (``pad_lengths``: left padding per row)."""
    request = Forward(
        model_id=model_id,
        nonce=secrets.token_bytes(NONCE_BYTES),
        start=hop.start,
        end=hop.end,
        wire_dtype=str(hidden.dtype).removeprefix("torch."),
        tensors=(hidden,),
        pad_lengths=pad_lengths,
    )
    try:
        stream = await asyncio.wait_for(
            connection.open_stream(hop.peer_id, "rpc_forward", _single(request.encode())),
            timeout,
        )
    except Exception as e:
        raise HopFailure(hop, f"cannot call forward: {e or type(e).__name__}") from e
    try:
        raw = await read_frame(stream, hop, timeout, reply_max_bytes(hidden))
    finally:
        await stream.aclose()
    return await connection.off_loop(
        _accept_forward, hop, raw, model_id, request.nonce, hidden, pad_lengths, verify_signatures
    )


def _accept_forward(
    hop: Hop,
    raw: bytes,
    model_id: str,
    nonce: bytes,
    hidden: torch.Tensor,
    pad_lengths: tuple[int, ...] | None,
    verify_signatures: bool,
) -> SignedReply:
    """(codec thread) A forward's reply, decoded, checked and verified."""
    reply: Reply = decode_for(hop, raw, Reply)
    check_output(hop, hidden, reply.output)
    signed = ActivationDigest.of(
        MessageKind.FORWARD,
        model_id,
        "",
        nonce,
        0,
        0,
        hop.start,
        hop.end,
        pad_lengths,
        [hidden],
        reply.output,
    )
    if verify_signatures:
        verify_reply(hop, signed, reply.signature)
    return SignedReply(hop.peer_id, signed, reply.signature or None, reply.output)


async def _single(request: runtime_pb2.ExpertRequest) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    yield request


def _sent_tensors(hidden: torch.Tensor, images: ImageInputs | None) -> list[torch.Tensor]:
    """The tensors of a step's request, in order: what the peer's signature covers."""
    return [hidden, *(images.tensors() if images is not None else ())]


def _check_images_inside(images: ImageInputs, begin: int, end: int) -> None:
    """Images to cut across messages must be well-formed and lie inside the step's tokens (a
    single message is sent as it is, and the peer checks it)."""
    positions = images.positions
    if positions.ndim != 2 or positions.shape[1] == 0 or positions.dtype != torch.int64:
        raise ValueError(f"image positions must be int64 [images, tokens], got {positions.shape}")
    if positions.min() < begin or positions.max() >= end:
        raise ValueError(f"image positions must lie in the step's tokens [{begin}, {end})")


def _images_in(images: ImageInputs | None, begin: int, end: int) -> ImageInputs | None:
    """The images whose placeholders lie in ``[begin, end)`` (chunks never split one)."""
    if images is None:
        return None
    inside = ((images.positions >= begin) & (images.positions < end)).all(dim=1)
    if not inside.any():
        return None
    return ImageInputs(images.features[inside], images.positions[inside])
