"""The peer's RPC handlers: ``info``, stateless ``forward`` and the ``inference`` stream."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import (  # noqa: UP035 - hivemind only detects streaming RPCs typed with typing.AsyncIterator
    Any,
    AsyncIterator,
)

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarmllm.blocks.span import BlockSpan
from swarmllm.blocks.vision import ADAPTER_BLOCK, ImageInputs, VisionAdapter
from swarmllm.peer.batching import BatchingWorker, Computed
from swarmllm.peer.sessions import BusyError, Session, SessionRegistry
from swarmllm.protocol import (
    ErrorCode,
    decode_meta,
    decode_tensors,
    encode_response,
    error_response,
)
from swarmllm.security.signing import (
    ActivationDigest,
    sign_activation,
)
from swarmllm.security.validation import (
    InvalidRequest,
    RequestLimits,
    check_hidden_states,
    check_image_inputs,
    check_int,
    check_message_size,
    check_str,
    wire_dtype,
)

logger = logging.getLogger("swarmllm.peer")

END_OF_STREAM_WAIT = 5.0  # seconds a forward stream waits for the client to end it


@dataclass
class PeerIdentity:
    model_id: str
    version: str
    private_key: Ed25519PrivateKey


class PeerServicer(ServicerBase):
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
        self.compute_dtype = next(span.parameters()).dtype
        self._sub_spans: dict[tuple[int, int], BlockSpan] = {}

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if (refusal := self._refuse_unlisted(context)) is not None:
            return refusal
        live = {"cache_tokens_left": self.registry.tokens_left, "sessions": len(self.registry)}
        return encode_response({**self.info, **live})

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stateless run of a whole sequence through a sub-span (one request, one reply)."""
        async for request in requests:
            yield await self._forward_reply(request, context)
            break
        # Returning closes the stream. Before the client has written its end-of-stream, that
        # breaks its pipe, and its stream reader then drops the reply it has not read yet.
        try:
            await asyncio.wait_for(anext(requests), END_OF_STREAM_WAIT)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        yield error_response("forward takes one request per stream", ErrorCode.INVALID)

    async def _forward_reply(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if (refusal := self._refuse_unlisted(context)) is not None:
            return refusal
        try:
            received = time.perf_counter()
            meta = self._decode(request)
            start, end = self._check_span(meta)
            dtype = wire_dtype(meta.get("wire_dtype"))
            hidden, extra = self._hidden_states(request, dtype, batch=None)
            images = self._images(extra, hidden, start, 0)
            pad_lengths = self._pad_lengths(meta, hidden.shape[0])
            span = self._sub_span(start, end)
            inputs = await self._compute_input(hidden, images, 0)
            computed = await self.worker.forward(span, inputs, None, pad_lengths)
            return self._signed_reply(
                meta, "", 0, 0, start, end, [hidden, *extra], computed, dtype, received
            )
        except InvalidRequest as e:
            return self._refuse(e, context)
        except Exception as e:  # a bug, not bad input: answer, log once, keep serving
            return self._internal_error(e, context)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Session | None = None
        try:
            async for request in requests:
                if session is None and (refusal := self._refuse_unlisted(context)) is not None:
                    yield refusal
                    return
                if not request.metadata and not request.tensors:
                    return  # the client ends the session
                try:
                    meta = self._decode(request)
                    if session is None:
                        session = self._open(meta, context)
                        yield encode_response({"opened": True, "version": self.identity.version})
                    else:
                        yield await self._step(session, meta, request)
                except InvalidRequest as e:
                    yield self._refuse(e, context)
                except BusyError as e:
                    yield error_response(str(e), ErrorCode.BUSY)
                    return
                except Exception as e:  # the session's cache may be inconsistent: end it
                    yield self._internal_error(e, context)
                    return
        finally:
            if session is not None:
                self.registry.close(session.session_id)

    def _open(self, meta: dict[str, Any], context: P2PContext) -> Session:
        opening = meta.get("open")
        if not isinstance(opening, dict):
            raise InvalidRequest("unknown session: the first message must open a session")
        start, end = self._check_span(opening)
        batch = check_int(opening, "batch", 1, self.limits.max_batch)
        session = Session(
            session_id=check_str(opening, "session_id"),
            remote_peer=context.remote_id.to_base58(),
            start=start,
            end=end,
            max_length=check_int(opening, "max_length", 1, self.limits.max_session_length),
            batch=batch,
            wire_dtype=wire_dtype(opening.get("wire_dtype")),
            cache=self._sub_span(start, end).new_cache(),
            pad_lengths=self._pad_lengths(opening, batch),
        )
        try:
            self.registry.open(session)
        except ValueError as e:  # the session id is taken
            raise InvalidRequest(str(e)) from e
        return session

    async def _step(
        self, session: Session, meta: dict[str, Any], request: runtime_pb2.ExpertRequest
    ) -> runtime_pb2.ExpertResponse:
        received = time.perf_counter()
        if self.registry.get(session.session_id) is not session:
            raise InvalidRequest(f"unknown session {session.session_id!r} (expired or closed)")
        position = check_int(meta, "position", 0, session.max_length - 1)
        step = check_int(meta, "step", 0, 2**62)
        if step <= session.last_step:
            raise InvalidRequest(f"out-of-order step {step}: the last step was {session.last_step}")
        if position > session.cache.length:
            raise InvalidRequest(
                f"position {position} leaves a gap: the session holds {session.cache.length} tokens"
            )
        hidden, extra = self._hidden_states(request, session.wire_dtype, session.batch)
        if position + hidden.shape[1] > session.max_length:
            raise InvalidRequest(
                f"position {position} + {hidden.shape[1]} tokens exceeds the session's max length "
                f"{session.max_length}"
            )
        images = self._images(extra, hidden, session.start, position)
        session.cache.truncate(position)  # a no-op unless the client rewinds
        session.last_step, session.last_used = step, time.monotonic()
        span = self._sub_span(session.start, session.end)
        inputs = await self._compute_input(hidden, images, position)
        computed = await self.worker.forward(span, inputs, session.cache, session.pad_lengths)
        return self._signed_reply(
            meta,
            session.session_id,
            position,
            step,
            session.start,
            session.end,
            [hidden, *extra],
            computed,
            session.wire_dtype,
            received,
        )

    def _signed_reply(
        self,
        meta: dict[str, Any],
        session_id: str,
        position: int,
        step: int,
        start: int,
        end: int,
        inputs: list[torch.Tensor],
        computed: Computed,
        dtype: torch.dtype,
        received: float,
    ) -> runtime_pb2.ExpertResponse:
        output = computed.output.to(dtype)
        digest = ActivationDigest.of(
            self.identity.model_id, session_id, position, step, start, end, inputs, output
        )
        signature = sign_activation(self.identity.private_key, digest)
        timing = {  # for the client's profile; not signed
            "compute_ms": computed.seconds * 1e3,
            "queue_ms": computed.queued * 1e3,
            "batch": computed.batch,
            "peer_ms": (time.perf_counter() - received) * 1e3,  # handling, compute included
        }
        return encode_response(
            {"position": position, "step": step, "signature": signature, **timing}, [output]
        )

    def _decode(self, request: runtime_pb2.ExpertRequest) -> dict[str, Any]:
        check_message_size(request.ByteSize(), self.limits)
        try:
            return decode_meta(request.metadata)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e

    def _check_span(self, meta: dict[str, Any]) -> tuple[int, int]:
        model_id = meta.get("model_id")
        if model_id != self.identity.model_id:
            raise InvalidRequest(
                f"model {model_id!r} is not served here (this peer serves {self.identity.model_id})"
            )
        start = check_int(meta, "start", 0, 2**31)
        end = check_int(meta, "end", 0, 2**31)
        if not self.span.start <= start < end <= self.span.end:
            raise InvalidRequest(
                f"span [{start}, {end}) is not served here (this peer serves "
                f"[{self.span.start}, {self.span.end}))"
            )
        return start, end

    def _pad_lengths(self, meta: dict[str, Any], batch: int | None = None) -> torch.Tensor | None:
        pads = meta.get("pad_lengths")
        if pads is None:
            return None
        if not isinstance(pads, list) or not all(isinstance(p, int) and p >= 0 for p in pads):
            raise InvalidRequest("field 'pad_lengths' must be a list of non-negative integers")
        if batch is not None and len(pads) != batch:
            raise InvalidRequest(f"'pad_lengths' has {len(pads)} entries for a batch of {batch}")
        return torch.tensor(pads) if any(pads) else None

    def _hidden_states(
        self, request: runtime_pb2.ExpertRequest, dtype: torch.dtype, batch: int | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        try:
            tensors = decode_tensors(request)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
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
        return hidden, extra

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
        hidden = hidden.to(self.compute_dtype)
        if images is None:
            return hidden
        return await self.worker.run(self.adapter, hidden, images, position)

    def _sub_span(self, start: int, end: int) -> BlockSpan:
        """A view of our layers ``[start, end)`` sharing weights (cached per sub-span)."""
        if (start, end) == (self.span.start, self.span.end):
            return self.span
        if (start, end) not in self._sub_spans:
            offset = self.span.start
            layers = self.span.layers[start - offset : end - offset]
            self._sub_spans[start, end] = BlockSpan(self.span.config, start, end, layers)
        return self._sub_spans[start, end]

    def _refuse(self, error: InvalidRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        logger.warning("refused a request from %s: %s", context.remote_id, error)
        return error_response(str(error), ErrorCode.INVALID)

    def _refuse_unlisted(self, context: P2PContext) -> runtime_pb2.ExpertResponse | None:
        """An error reply for a client missing from ``--allowed-peers``; None for the others."""
        remote = context.remote_id.to_base58()
        if self.allowed_peers is None or remote in self.allowed_peers:
            return None
        logger.warning("refused %s: not on the allowed-peers list", remote)
        return error_response(
            f"peer {remote} is not on this peer's allowed-peers list (a private swarm)",
            ErrorCode.FORBIDDEN,
        )

    def _internal_error(self, error: Exception, context: P2PContext) -> runtime_pb2.ExpertResponse:
        logger.exception("internal error serving %s", context.remote_id, exc_info=error)
        return error_response(
            f"internal error: {error or type(error).__name__}", ErrorCode.INTERNAL
        )
