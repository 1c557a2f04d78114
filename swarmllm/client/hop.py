"""One open inference stream to one peer, for one sub-span, with every reply verified."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.profile import HopTiming
from swarmllm.client.routing import Hop
from swarmllm.protocol import ErrorCode, decode_meta, decode_tensors, encode_request
from swarmllm.security.signing import (
    ActivationDigest,
    SignatureError,
    verify_activation,
)

logger = logging.getLogger("swarmllm.client")


class HopFailure(RuntimeError):
    """A hop could not serve a step; ``fault`` is False for a healthy peer that is merely busy."""

    def __init__(self, hop: Hop, reason: str, *, fault: bool = True):
        super().__init__(f"peer {hop.peer_id} (blocks {hop.start}-{hop.end - 1}): {reason}")
        self.hop, self.reason, self.fault = hop, reason, fault


@dataclass(frozen=True)
class SessionSpec:
    """What every hop of one inference session is opened with."""

    model_id: str
    session_id: str
    max_length: int
    batch: int = 1
    pad_lengths: tuple[int, ...] | None = None
    wire_dtype: str = "float32"
    step_timeout: float = 10.0  # seconds for one step, plus TOKEN_TIMEOUT per token sent
    verify_signatures: bool = True

    def timeout_for(self, num_tokens: int) -> float:
        return self.step_timeout + TOKEN_TIMEOUT * num_tokens * self.batch


TOKEN_TIMEOUT = 0.05
PROBE_AFTER = 0.5  # seconds a reply may be late before the client checks the peer still answers
PROBE_TIMEOUT = 2.0  # seconds for that check


class HopStream:
    def __init__(self, connection: SwarmConnection, hop: Hop, spec: SessionSpec):
        self.connection, self.hop, self.spec = connection, hop, spec
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self._step = 0
        self.last_timing: HopTiming | None = None  # of the latest step, for profiles
        self.last_signature: object = None  # as the latest reply carried it (evidence)

    async def open(self) -> None:
        opening = {
            "model_id": self.spec.model_id,
            "session_id": self.spec.session_id,
            "start": self.hop.start,
            "end": self.hop.end,
            "max_length": self.spec.max_length,
            "batch": self.spec.batch,
            "pad_lengths": list(self.spec.pad_lengths) if self.spec.pad_lengths else None,
            "wire_dtype": self.spec.wire_dtype,
        }
        self._outbox.put_nowait(encode_request({"open": opening}))
        try:
            stub = self.connection.stub(self.hop.peer_id)
            self._replies = await asyncio.wait_for(
                stub.rpc_inference(self._requests()), self.spec.step_timeout
            )
        except Exception as e:
            raise HopFailure(self.hop, f"cannot open a stream: {e or type(e).__name__}") from e
        meta, _ = await self._receive(self.spec.step_timeout)
        if not meta.get("opened"):
            raise HopFailure(self.hop, f"unexpected reply to opening the session: {meta}")

    async def step(
        self, hidden: torch.Tensor, position: int, images: ImageInputs | None = None
    ) -> torch.Tensor:
        """Send new hidden states starting at ``position`` (with image features for the
        adapter of a first hop); return the verified output."""
        self._step += 1
        sent = time.perf_counter()
        request = {"position": position, "step": self._step}
        self._outbox.put_nowait(encode_request(request, _sent_tensors(hidden, images)))
        meta, tensors = await self._receive(self.spec.timeout_for(hidden.shape[1]))
        if meta.get("position") != position or meta.get("step") != self._step or len(tensors) != 1:
            raise HopFailure(self.hop, f"reply does not match step {self._step}: {meta}")
        output = tensors[0]
        if output.shape != hidden.shape or output.dtype != hidden.dtype:
            raise HopFailure(
                self.hop,
                f"reply has shape {list(output.shape)} {output.dtype}, "
                f"expected {list(hidden.shape)} {hidden.dtype}",
            )
        if self.spec.verify_signatures:
            self._verify(meta, position, hidden, output, images)
        self.last_timing = HopTiming.from_reply(time.perf_counter() - sent, meta)
        self.last_signature = meta.get("signature")
        return output

    @property
    def steps_sent(self) -> int:
        """The step number of the latest message (steps count from 1)."""
        return self._step

    def _verify(
        self,
        meta: dict[str, Any],
        position: int,
        hidden: torch.Tensor,
        output: torch.Tensor,
        images: ImageInputs | None,
    ) -> None:
        signed = self.digest(position, self._step, hidden, output, images)
        verify_reply(self.hop, signed, meta.get("signature"))

    def digest(
        self,
        position: int,
        step: int,
        hidden: torch.Tensor,
        output: torch.Tensor,
        images: ImageInputs | None = None,
    ) -> ActivationDigest:
        """What the peer must have signed for ``output`` of step ``step``: the input digest
        covers every tensor sent, image features and positions included."""
        return ActivationDigest.of(
            self.spec.model_id,
            self.spec.session_id,
            position,
            step,
            self.hop.start,
            self.hop.end,
            _sent_tensors(hidden, images),
            output,
        )

    async def _receive(self, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The next reply. While it is late, ping the peer every ``PROBE_AFTER`` seconds: a
        dead peer's stream does not always drop, and a failed ping fails the hop at once
        instead of at the timeout."""
        assert self._replies is not None
        reply = asyncio.ensure_future(read_reply(self._replies, self.hop, timeout))
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
        self._outbox.put_nowait(runtime_pb2.ExpertRequest())
        self._outbox.put_nowait(None)
        if self._replies is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._replies.aclose(), 1.0)


async def read_reply(
    replies: AsyncIterator[runtime_pb2.ExpertResponse], hop: Hop, timeout: float
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The next reply of a stream, decoded; every way it can fail becomes a ``HopFailure``."""
    try:
        reply = await asyncio.wait_for(anext(replies), timeout)
    except StopAsyncIteration:
        raise HopFailure(hop, "the peer closed the stream") from None
    except asyncio.TimeoutError:
        raise HopFailure(hop, f"no reply within {timeout:.1f} s") from None
    except Exception as e:
        raise HopFailure(hop, f"stream failed: {e or type(e).__name__}") from e
    try:
        meta, tensors = decode_meta(reply.metadata), decode_tensors(reply)
    except ValueError as e:
        raise HopFailure(hop, f"malformed reply: {e}") from e
    if "error" in meta:
        busy = meta.get("code") == ErrorCode.BUSY
        raise HopFailure(hop, f"error reply: {meta['error']}", fault=not busy)
    return meta, tensors


def verify_reply(hop: Hop, signed: ActivationDigest, signature: object) -> None:
    """Check the hop's signature over ``signed``; log the evidence and fail the hop if bad."""
    try:
        if not isinstance(signature, bytes):
            raise SignatureError(f"reply from {hop.peer_id} carries no signature")
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


@dataclass(frozen=True)
class SignedReply:
    """A peer's output with the digest it signed and its signature: evidence a third party
    can check with the peer id alone."""

    peer_id: str
    digest: ActivationDigest
    signature: bytes | None  # None only when the reply carried none and nobody checked
    output: torch.Tensor


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
    meta = {
        "model_id": model_id,
        "start": hop.start,
        "end": hop.end,
        "wire_dtype": str(hidden.dtype).removeprefix("torch."),
        "pad_lengths": list(pad_lengths) if pad_lengths else None,
    }
    try:
        stub = connection.stub(hop.peer_id)
        replies = await asyncio.wait_for(
            stub.rpc_forward(_single(encode_request(meta, [hidden]))), timeout
        )
    except Exception as e:
        raise HopFailure(hop, f"cannot call forward: {e or type(e).__name__}") from e
    reply_meta, tensors = await read_reply(replies, hop, timeout)
    if len(tensors) != 1 or tensors[0].shape != hidden.shape:
        raise HopFailure(hop, f"forward reply has the wrong shape: {reply_meta}")
    signed = ActivationDigest.of(model_id, "", 0, 0, hop.start, hop.end, [hidden], tensors[0])
    signature = reply_meta.get("signature")
    if verify_signatures:
        verify_reply(hop, signed, signature)
    signature = signature if isinstance(signature, bytes) else None
    return SignedReply(hop.peer_id, signed, signature, tensors[0])


async def _single(request: runtime_pb2.ExpertRequest) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    yield request


def _sent_tensors(hidden: torch.Tensor, images: ImageInputs | None) -> list[torch.Tensor]:
    """The tensors of a step's request, in order: what the peer's signature covers."""
    return [hidden, *(images.tensors() if images is not None else ())]
