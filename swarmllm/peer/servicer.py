"""The peer's RPC handlers (``protocol.SwarmRPC``): ``info``, stateless ``forward`` and the
``inference`` stream.

The event loop only routes messages: decoding, every check of a tensor, digests and signing run
on the codec threads, and compute on the compute thread, so a large message never stalls the
other sessions or the pings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import (  # noqa: UP035 - hivemind only detects streaming RPCs typed with typing.AsyncIterator
    Any,
    AsyncIterator,
    TypeVar,
)

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from swarmllm.blocks.span import BlockSpan
from swarmllm.blocks.vision import ADAPTER_BLOCK, ImageInputs, VisionAdapter
from swarmllm.peer.batching import BatchingWorker, Computed
from swarmllm.peer.sessions import BusyError, Session, SessionRegistry
from swarmllm.protocol import (
    Error,
    ErrorCode,
    Forward,
    InfoReply,
    MalformedMessage,
    Open,
    Opened,
    Reply,
    Step,
    SwarmRPC,
    VersionMismatch,
    is_close,
    shorten,
    unpack_meta,
)
from swarmllm.security.signing import ActivationDigest, MessageKind, sign_activation
from swarmllm.security.validation import (
    InvalidRequest,
    RequestLimits,
    check_hidden_states,
    check_image_inputs,
    check_message_size,
    check_pad_lengths,
    check_range,
    wire_dtype,
)

logger = logging.getLogger("swarmllm.peer")

T = TypeVar("T")

END_OF_STREAM_WAIT = 5.0  # seconds a finished stream waits for the client to end it
REFUSED_STREAM_READS = 3  # requests a refused inference stream reads before it gives up
CODEC_THREADS = 2


@dataclass
class PeerIdentity:
    model_id: str
    version: str
    private_key: Ed25519PrivateKey


@dataclass(frozen=True)
class _Inputs:
    """A request's tensors, checked: the hidden states, what followed them, the images."""

    hidden: torch.Tensor
    extra: list[torch.Tensor]
    images: ImageInputs | None


class PeerServicer(SwarmRPC):
    def __init__(
        self,
        span: BlockSpan,
        identity: PeerIdentity,
        registry: SessionRegistry,
        worker: BatchingWorker,
        limits: RequestLimits,
        info: dict[str, Any],
        allowed_peers: frozenset[str] | None = None,
        adapter: VisionAdapter | None = None,
    ):
        self.span, self.identity, self.registry = span, identity, registry
        self.worker, self.limits, self.info = worker, limits, info
        self.allowed_peers = allowed_peers  # None: serve everyone (a public swarm)
        self.adapter = adapter  # the vision adapter block, served only with block 0
        self.compute_dtype = span.dtype  # quantized weights do not tell it
        self._sub_spans: dict[tuple[int, int], BlockSpan] = {}
        self._codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="swarmllm-codec")
        self._forwards: Counter[str] = Counter()  # stateless forwards running, per client

    def move_to(
        self,
        span: BlockSpan,
        info: dict[str, Any],
        adapter: VisionAdapter | None,
        drain_seconds: float,
    ) -> int:
        """Serve ``span`` (with ``adapter``, ``info``) from now on. The sessions open now go
        on with the layers they hold for ``drain_seconds`` more, then end (their clients open
        the blocks anew, maybe here); the old layers are freed when the last of them ends.
        Returns how many sessions drain."""
        self.span, self.info, self.adapter = span, info, adapter
        self.compute_dtype = span.dtype
        self._sub_spans = {}
        deadline = time.monotonic() + drain_seconds
        draining = self.registry.sessions()
        for session in draining:
            session.drain_by = min(session.drain_by, deadline)
        return len(draining)

    async def _off_loop(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._codec, fn, *args)

    # --- info ---------------------------------------------------------------------------------

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if (refusal := self._refuse_unlisted(context)) is not None:
            return refusal
        return InfoReply(
            **self.info,
            cache_tokens_left=self.registry.tokens_left,
            sessions=len(self.registry),
            max_tokens=self.limits.max_tokens_per_message,
            max_bytes=self.limits.max_message_bytes,
        ).encode()

    # --- stateless forward --------------------------------------------------------------------

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stateless run of a whole sequence through a sub-span (one request, one reply)."""
        async for request in requests:
            yield await self._forward_reply(request, context)
            break
        if await _next_or_end(requests) is not None:
            yield Error("forward takes one request per stream", ErrorCode.INVALID).encode()

    async def _forward_reply(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if (refusal := self._refuse_unlisted(context)) is not None:
            return refusal
        remote = context.remote_id.to_base58()
        if self._forwards[remote] >= self.limits.max_forwards_per_peer:
            return Error(
                f"busy: this client already runs {self._forwards[remote]} stateless forwards "
                "(the per-peer limit)",
                ErrorCode.BUSY,
            ).encode()
        self._forwards[remote] += 1
        try:
            received = time.perf_counter()
            forward, inputs, pads = await self._off_loop(self._decode_forward, request)
            span = self._sub_span(forward.start, forward.end)
            hidden = await self._compute_input(inputs.hidden, inputs.images, 0)
            computed = await self.worker.forward(span, hidden, None, pads)
            digest = (MessageKind.FORWARD, "", forward.nonce, 0, 0, forward.start, forward.end)
            return await self._off_loop(
                self._signed_reply,
                digest,
                forward.pad_lengths,
                [inputs.hidden, *inputs.extra],
                computed,
                wire_dtype(forward.wire_dtype),
                received,
            )
        except MalformedMessage as e:
            return self._refuse(e, context)
        except Exception as e:  # a bug, not bad input: answer, log once, keep serving
            return self._internal_error(e, context)
        finally:
            self._forwards[remote] -= 1
            if not self._forwards[remote]:
                del self._forwards[remote]

    def _decode_forward(
        self, request: runtime_pb2.ExpertRequest
    ) -> tuple[Forward, _Inputs, torch.Tensor | None]:
        """(codec thread) The forward request, every field and tensor checked."""
        check_message_size(request.ByteSize(), self.limits)
        forward = Forward.decode(unpack_meta(request.metadata), request)
        self._check_span(forward.model_id, forward.start, forward.end)
        inputs = self._inputs(
            list(forward.tensors), wire_dtype(forward.wire_dtype), None, forward.start, 0
        )
        rows, tokens = inputs.hidden.shape[:2]
        if rows * tokens > self.limits.max_forward_tokens:
            raise InvalidRequest(
                f"a forward of {rows} x {tokens} tokens exceeds the limit of "
                f"{self.limits.max_forward_tokens} tokens (rows x tokens)"
            )
        pads = check_pad_lengths(forward.pad_lengths, rows, tokens)
        return forward, inputs, pads

    # --- inference stream -------------------------------------------------------------------

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        if (refusal := self._refuse_unlisted(context)) is not None:
            yield refusal
            # the client's open and then its close follow; returning first lost the refusal
            for _ in range(REFUSED_STREAM_READS):
                if await _next_or_end(requests) is None:
                    break
            return
        remote = context.remote_id.to_base58()
        started = time.monotonic()
        session: Session | None = None
        try:
            while True:
                wait = self._time_left(session, started)
                try:
                    request = await asyncio.wait_for(anext(requests), max(wait, 0.0))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    yield self._expired(session, context).encode()
                    return  # ends the stream; the finally below frees the cache
                if is_close(request):
                    return  # the client ends the session
                if session is not None and time.monotonic() >= session.drain_by:
                    # a step that came after its drain (its wait began before the peer moved)
                    yield self._expired(session, context).encode()
                    return
                try:
                    if session is None:
                        session = await self._open(request, remote)
                        yield Opened(
                            self.identity.version,
                            self.limits.max_tokens_per_message,
                            self.limits.max_message_bytes,
                        ).encode()
                    else:
                        yield await self._step(session, request)
                except VersionMismatch as e:
                    yield Error(str(e), ErrorCode.VERSION).encode()
                    return
                except MalformedMessage as e:
                    yield self._refuse(e, context)
                except BusyError as e:
                    yield Error(str(e), ErrorCode.BUSY).encode()
                    return
                except Exception as e:  # the session's cache may be inconsistent: end it
                    yield self._internal_error(e, context)
                    return
        finally:
            if session is not None:
                self.registry.close(session)

    def _time_left(self, session: Session | None, started: float) -> float:
        """Seconds the stream may wait for its next message: the idle timeout, and at most
        what is left of the session's lifetime (or of its draining, once the peer moved)."""
        now = time.monotonic()
        if session is None:
            return started + self.limits.session_idle_timeout - now
        return (
            min(
                session.last_used + self.limits.session_idle_timeout,
                session.opened_at + self.limits.max_session_lifetime,
                session.drain_by,
            )
            - now
        )

    def _expired(self, session: Session | None, context: P2PContext) -> Error:
        if session is None:
            message = f"no session opened within {self.limits.session_idle_timeout:.0f} s"
        elif time.monotonic() >= session.drain_by:  # the client reopens elsewhere, no blame
            message = (
                f"session expired: this peer moved to blocks [{self.span.start}, "
                f"{self.span.end}) and its sessions from before have drained"
            )
        elif time.monotonic() - session.opened_at >= self.limits.max_session_lifetime:
            message = (
                f"session expired: open longer than the {self.limits.max_session_lifetime:.0f} s "
                "a session may last; its cache is freed"
            )
        else:
            message = (
                f"session expired: no step for {self.limits.session_idle_timeout:.0f} s; "
                "its cache is freed"
            )
        logger.info("closed a stream of %s: %s", context.remote_id, message)
        return Error(message, ErrorCode.EXPIRED)

    async def _open(self, request: runtime_pb2.ExpertRequest, remote: str) -> Session:
        opening = await self._off_loop(self._decode_open, request)
        start, end = opening.start, opening.end
        pads = check_pad_lengths(opening.pad_lengths, opening.batch, opening.max_length)
        session = Session(
            stream_id=opening.stream_id,
            remote_peer=remote,
            nonce=opening.nonce,
            start=start,
            end=end,
            max_length=opening.max_length,
            batch=opening.batch,
            wire_dtype=wire_dtype(opening.wire_dtype),
            span=(span := self._sub_span(start, end)),
            cache=span.new_cache(capacity=opening.max_length),
            pad_lengths=opening.pad_lengths if pads is not None else None,
            pad_tensor=pads,
        )
        try:
            self.registry.open(session)
        except ValueError as e:  # this client reuses one of its own open stream ids
            raise InvalidRequest(str(e)) from e
        return session

    def _decode_open(self, request: runtime_pb2.ExpertRequest) -> Open:
        """(codec thread)"""
        check_message_size(request.ByteSize(), self.limits)
        meta = unpack_meta(request.metadata)
        if meta.get("kind") == Step.KIND:
            raise InvalidRequest("unknown session: the first message must open a session")
        opening = Open.decode(meta)
        self._check_span(opening.model_id, opening.start, opening.end)
        check_range("max_length", opening.max_length, 1, self.limits.max_session_length)
        check_range("batch", opening.batch, 1, self.limits.max_batch)
        wire_dtype(opening.wire_dtype)
        return opening

    async def _step(
        self, session: Session, request: runtime_pb2.ExpertRequest
    ) -> runtime_pb2.ExpertResponse:
        received = time.perf_counter()
        if self.registry.get(session.key) is not session:
            raise InvalidRequest(f"unknown session {shorten(session.stream_id)} (closed)")
        step, inputs = await self._off_loop(self._decode_step, session, request)
        session.cache.truncate(step.position)  # a no-op unless the client rewinds
        session.last_step, session.last_used = step.step, time.monotonic()
        hidden = await self._compute_input(inputs.hidden, inputs.images, step.position)
        computed = await self.worker.forward(
            session.span, hidden, session.cache, session.pad_tensor
        )
        session.last_used = time.monotonic()
        digest = (
            MessageKind.INFERENCE,
            session.stream_id,
            session.nonce,
            step.position,
            step.step,
            session.start,
            session.end,
        )
        return await self._off_loop(
            self._signed_reply,
            digest,
            session.pad_lengths,
            [inputs.hidden, *inputs.extra],
            computed,
            session.wire_dtype,
            received,
        )

    def _decode_step(
        self, session: Session, request: runtime_pb2.ExpertRequest
    ) -> tuple[Step, _Inputs]:
        """(codec thread) The step request, every field and tensor checked against the session."""
        check_message_size(request.ByteSize(), self.limits)
        step = Step.decode(unpack_meta(request.metadata), request)
        position = check_range("position", step.position, 0, session.max_length - 1)
        if step.step <= session.last_step:
            raise InvalidRequest(
                f"out-of-order step {step.step}: the last step was {session.last_step}"
            )
        if position > session.cache.length:
            raise InvalidRequest(
                f"position {position} leaves a gap: the session holds {session.cache.length} tokens"
            )
        inputs = self._inputs(
            list(step.tensors), session.wire_dtype, session.batch, session.start, position
        )
        if position + inputs.hidden.shape[1] > session.max_length:
            raise InvalidRequest(
                f"position {position} + {inputs.hidden.shape[1]} tokens exceeds the session's "
                f"max length {session.max_length}"
            )
        return step, inputs

    # --- shared pieces ------------------------------------------------------------------------

    def _signed_reply(
        self,
        exchange: tuple[str, str, bytes, int, int, int, int],
        pad_lengths: tuple[int, ...] | None,
        inputs: list[torch.Tensor],
        computed: Computed,
        dtype: torch.dtype,
        received: float,
    ) -> runtime_pb2.ExpertResponse:
        """(codec thread) The reply to one exchange ``(kind, stream id, nonce, position, step,
        start, end)``, signed."""
        kind, stream_id, nonce, position, step, start, end = exchange
        output = computed.output.to(dtype)
        digest = ActivationDigest.of(
            kind,
            self.identity.model_id,
            stream_id,
            nonce,
            position,
            step,
            start,
            end,
            pad_lengths,
            inputs,
            output,
        )
        signature = sign_activation(self.identity.private_key, digest)
        timing = {  # for the client's profile; not signed
            "compute_ms": computed.seconds * 1e3,
            "queue_ms": computed.queued * 1e3,
            "batch": computed.batch,
            "peer_ms": (time.perf_counter() - received) * 1e3,  # handling, compute included
        }
        return Reply(position, step, signature, output, timing).encode()

    def _check_span(self, model_id: str, start: int, end: int) -> None:
        if model_id != self.identity.model_id:
            raise InvalidRequest(
                f"model {shorten(model_id)} is not served here (this peer serves "
                f"{self.identity.model_id})"
            )
        if not self.span.start <= start < end <= self.span.end:
            raise InvalidRequest(
                f"span [{start}, {end}) is not served here (this peer serves "
                f"[{self.span.start}, {self.span.end}))"
            )

    def _inputs(
        self,
        tensors: list[torch.Tensor],
        dtype: torch.dtype,
        batch: int | None,
        start: int,
        position: int,
    ) -> _Inputs:
        """(codec thread) The hidden states and image input of a request, checked."""
        if not tensors:
            raise InvalidRequest("the message carries no hidden states")
        hidden, *extra = tensors
        check_hidden_states(
            hidden,
            hidden_size=self.span.config.hidden_size,
            dtype=dtype,
            batch=batch,
            limits=self.limits,
        )
        return _Inputs(hidden, extra, self._images(extra, hidden, start, position))

    def _images(
        self, extra: list[torch.Tensor], hidden: torch.Tensor, start: int, position: int
    ) -> ImageInputs | None:
        """The image input that may follow the hidden states: [features, positions]."""
        if not extra:
            return None
        if self.adapter is None:
            raise InvalidRequest(
                f"this peer serves no {ADAPTER_BLOCK!r} adapter, so it cannot take image "
                "features: send them to a block-0 peer that announces the adapter"
            )
        if start != 0:
            raise InvalidRequest(f"image features enter at block 0, not at block {start}")
        if len(extra) != 2:
            raise InvalidRequest(
                f"image input is two tensors [features, positions], got {len(extra)}"
            )
        features, positions = extra
        check_image_inputs(
            features,
            positions,
            feature_dim=self.adapter.feature_dim,
            dtype=hidden.dtype,
            batch=hidden.shape[0],
            position=position,
            num_tokens=hidden.shape[1],
        )
        return ImageInputs(features, positions)

    async def _compute_input(
        self, hidden: torch.Tensor, images: ImageInputs | None, position: int
    ) -> torch.Tensor:
        """``hidden`` in the compute dtype, with the projected images spliced in."""
        if images is None:
            return hidden.to(self.compute_dtype)
        return await self.worker.run(self.adapter, hidden.to(self.compute_dtype), images, position)

    def _sub_span(self, start: int, end: int) -> BlockSpan:
        """A view of our layers ``[start, end)`` sharing weights (cached per sub-span)."""
        if (start, end) == (self.span.start, self.span.end):
            return self.span
        if (start, end) not in self._sub_spans:
            self._sub_spans[start, end] = self.span.sub_span(start, end)
        return self._sub_spans[start, end]

    def _refuse(self, error: Exception, context: P2PContext) -> runtime_pb2.ExpertResponse:
        message = str(error)[:1000]  # every echoed value in it is already shortened
        logger.warning("refused a request from %s: %s", context.remote_id, message)
        return Error(message, ErrorCode.INVALID).encode()

    def _refuse_unlisted(self, context: P2PContext) -> runtime_pb2.ExpertResponse | None:
        """An error reply for a client missing from ``--allowed-peers``; None for the others."""
        remote = context.remote_id.to_base58()
        if self.allowed_peers is None or remote in self.allowed_peers:
            return None
        logger.warning("refused %s: not on the allowed-peers list", remote)
        return Error(
            f"peer {remote} is not on this peer's allowed-peers list (a private swarm)",
            ErrorCode.FORBIDDEN,
        ).encode()

    def _internal_error(self, error: Exception, context: P2PContext) -> runtime_pb2.ExpertResponse:
        logger.exception("internal error serving %s", context.remote_id, exc_info=error)
        return Error(
            f"internal error: {shorten(str(error) or type(error).__name__)}", ErrorCode.INTERNAL
        ).encode()


async def _next_or_end(
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
) -> runtime_pb2.ExpertRequest | None:
    """The client's next request; None once it ends the stream or END_OF_STREAM_WAIT passes.

    A handler that is done waits here before it returns: returning closes the stream, and
    before the client has written its end of stream that breaks its pipe, so its stream
    reader drops the reply it has not read yet ("the peer closed the stream").
    """
    try:
        return await asyncio.wait_for(anext(requests), END_OF_STREAM_WAIT)
    except (StopAsyncIteration, asyncio.TimeoutError):
        return None
