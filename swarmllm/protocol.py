"""The wire protocol (version 2) of peers and clients: every message, once, as a typed record.

Every RPC message is a hivemind ``ExpertRequest``/``ExpertResponse``: a msgpack map of metadata
(``{"kind": ..., **fields}``) plus tensors serialized by hivemind. Tensors travel in the wire
dtype exactly as they are digested and signed, so the bytes a peer signs are the bytes the
client checks. Each record has one ``encode`` and one ``decode``; ``decode`` checks every
field's type and absolute bounds (a peer then checks them against its own limits) and raises
``MalformedMessage`` naming the field, with any echoed value shortened (``shorten``).

``rpc_inference`` (a bidirectional stream), client → peer:
  1. ``Open`` (kind ``open``): model, span, ``stream_id`` and ``nonce`` (both chosen by the
     client, fresh for every stream: every hop and every replacement has its own), max length,
     batch layout, wire dtype, protocol version. Answered by ``Opened`` (kind ``opened``: the
     peer's ``protocol`` and software ``version``, and the per-message limits a client must
     chunk to) or an ``Error``.
  2. ``Step`` (kind ``step``: ``position``, ``step``) + ``[hidden, *extra]`` per chunk of new
     tokens, answered by ``Reply`` (kind ``reply``: ``position``, ``step``, ``signature``,
     timing) + ``[output]``.
  3. An empty message (or closing the stream) ends the session.
``*extra`` is empty, or, in a message to a first hop serving the vision adapter, the image input
``[features [images, tokens, feature_dim], positions [images, tokens] int64]``: the features the
adapter projects and the absolute token positions (batch row 0) they replace
(``swarmllm.blocks.vision``). The signed digest (``security.signing.ActivationDigest``) covers
``[hidden, *extra]``, the output, the span, position and step, the batch layout, the message
kind and the stream's nonce.

``rpc_forward`` (one request, one reply): ``Forward`` (kind ``forward``, with a fresh nonce) +
``[hidden]``, answered by a ``Reply``. ``rpc_info``: ``Info`` answered by ``InfoReply``.
Any reply may instead be an ``Error`` (kind ``error``: ``message``, ``code``).

A peer answers a client of another major protocol version (including a version-1 client, whose
messages carry no ``kind``) with an ``Error`` of code ``version``.

Bounds: metadata larger than ``MAX_METADATA_BYTES`` is refused before msgpack decodes it. The
frame itself is read whole by hivemind before any handler sees it (its stream framing has an
8-byte length header and no configurable cap), so a peer's memory per stream is bounded only by
hivemind's prefetch of 5 frames of whatever size the sender wrote; the peer refuses (without
decoding) any message over its ``max_message_bytes``. A client reads its streams itself
(``swarmllm.framing``) and refuses, before reading it, any reply frame longer than the reply it
expects (``check_message_size``, the same check), so no peer can make it buffer more.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import (  # noqa: UP035 - hivemind only detects streaming RPCs typed with typing.AsyncIterator
    Any,
    AsyncIterator,
    ClassVar,
)

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

PROTOCOL_VERSION = (2, 0)  # (major, minor): peers refuse clients of another major version
PROTOCOL_MAJOR = PROTOCOL_VERSION[0]

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# hivemind names handlers "{namespace}::{class name}.{method}"; this class name has not changed
# since version 1, so a client of any version reaches the peer and can be told its version.
SERVICER_NAMESPACE = "swarmllm"
_HANDLER_CLASS = "PeerServicer"

MAX_METADATA_BYTES = 64 * 1024  # larger metadata is refused before it is decoded
MAX_STRING = 256  # characters of any string field (model ids, stream ids, names)
MAX_ITEMS = 1024  # entries of any list field (pad lengths, adapters)
MAX_INT = 2**62  # bound of every integer field
MIN_NONCE, MAX_NONCE = 16, 64  # bytes of a stream's nonce
MAX_ECHO = 120  # characters of a value echoed back in an error or a log line

_short = reprlib.Repr()
_short.maxstring = _short.maxother = MAX_ECHO
_short.maxlevel, _short.maxlist, _short.maxdict, _short.maxtuple = 2, 4, 4, 4


def shorten(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, safe on huge or deeply nested
    values: the only way a value from the wire may enter an error message or a log line."""
    text = _short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ErrorCode:
    BUSY = "busy"  # no room for the session: route elsewhere, the peer is healthy
    INVALID = "invalid"  # the request is malformed or violates a limit: the sender's fault
    UNAVAILABLE = "unavailable"  # the peer is not serving (joining, leaving, wrong model)
    FORBIDDEN = "forbidden"  # a private peer that does not serve this client
    VERSION = "version"  # the client speaks another major protocol version
    EXPIRED = "expired"  # the session outlived its idle timeout or lifetime; the cache is gone
    INTERNAL = "internal"


class MalformedMessage(ValueError):
    """A message that breaks the protocol; the text names the problem and is safe to send."""


class MessageTooLarge(MalformedMessage):
    """A message over the receiver's size limit, refused before it is decoded (or read)."""


def check_message_size(num_bytes: int, limit: int, what: str = "message") -> None:
    """The size check of every message, on both sides: a peer's of each request, a client's of
    each reply frame before it reads it."""
    if num_bytes > limit:
        raise MessageTooLarge(f"{what} of {num_bytes} bytes exceeds the limit of {limit} bytes")


class RemoteError(RuntimeError):
    """An error reply from a peer."""

    def __init__(self, message: str, code: str = ErrorCode.INTERNAL, peer_id: str = ""):
        message = message[: 4 * MAX_ECHO]  # a peer's text, shortened before it is logged
        super().__init__(f"{peer_id}: {message}" if peer_id else message)
        self.code, self.peer_id, self.reason = code, peer_id, message


# --- field readers: every value from the wire is read through one of these -----------------


def _int(meta: Mapping, key: str, low: int = 0, high: int = MAX_INT) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedMessage(f"field {key!r} must be an integer, got {shorten(value)}")
    if not low <= value <= high:
        raise MalformedMessage(f"field {key!r} = {shorten(value)} is outside [{low}, {high}]")
    return value


def _str(meta: Mapping, key: str, *, empty: bool = False) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or (not value and not empty) or len(value) > MAX_STRING:
        raise MalformedMessage(
            f"field {key!r} must be a {'' if empty else 'non-empty '}string of at most "
            f"{MAX_STRING} chars, got {shorten(value)}"
        )
    return value


def _bytes(meta: Mapping, key: str, low: int, high: int) -> bytes:
    value = meta.get(key)
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise MalformedMessage(f"field {key!r} must be {low}-{high} bytes, got {shorten(value)}")
    return value


def _int_list(meta: Mapping, key: str) -> tuple[int, ...] | None:
    value = meta.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_ITEMS
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT for v in value
        )
    ):
        raise MalformedMessage(
            f"field {key!r} must be a list of at most {MAX_ITEMS} non-negative integers, "
            f"got {shorten(value)}"
        )
    return tuple(value)


def _str_list(meta: Mapping, key: str) -> tuple[str, ...]:
    value = meta.get(key, [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_ITEMS
        or not all(isinstance(v, str) and len(v) <= MAX_STRING for v in value)
    ):
        raise MalformedMessage(f"field {key!r} must be a list of strings, got {shorten(value)}")
    return tuple(value)


def _float(meta: Mapping, key: str) -> float:
    """An informational number (timings, throughput): garbage reads as zero."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return 0.0
    return float(min(value, 1e18))


def _version(meta: Mapping) -> tuple[int, int]:
    value = meta.get("protocol")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**16 for v in value)
    ):
        raise MalformedMessage(f"field 'protocol' must be [major, minor], got {shorten(value)}")
    return value[0], value[1]


def check_version(version: tuple[int, int], who: str) -> None:
    """Raise ``VersionMismatch`` unless ``version`` has our major version."""
    if version[0] != PROTOCOL_MAJOR:
        raise VersionMismatch(
            f"{who} speaks swarmllm protocol {version[0]}.{version[1]}, this side speaks "
            f"{PROTOCOL_MAJOR}.{PROTOCOL_VERSION[1]}: upgrade the older side"
        )


class VersionMismatch(MalformedMessage):
    """The other side speaks another major protocol version."""


# --- framing ------------------------------------------------------------------------------


def _pack(kind: str, fields: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"kind": kind, **fields}, use_bin_type=True)


def unpack_meta(raw: bytes) -> dict[str, Any]:
    """The metadata map of a message, size-checked before decoding."""
    if len(raw) > MAX_METADATA_BYTES:
        raise MalformedMessage(
            f"metadata of {len(raw)} bytes exceeds the limit of {MAX_METADATA_BYTES} bytes"
        )
    if not raw:
        return {}
    try:
        meta = msgpack.unpackb(raw, raw=False)  # its lengths are bounded by len(raw)
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as e:
        raise MalformedMessage(f"metadata is not valid msgpack: {shorten(str(e))}") from None
    if not isinstance(meta, dict):
        raise MalformedMessage(f"metadata must be a map, got {type(meta).__name__}")
    return meta


def kind_of(meta: Mapping[str, Any]) -> str:
    kind = meta.get("kind")
    if kind is None and "open" in meta:  # a version-1 opening: {"open": {...}}
        raise VersionMismatch(
            "the client speaks swarmllm protocol 1, this peer speaks "
            f"{PROTOCOL_MAJOR}.{PROTOCOL_VERSION[1]}: upgrade the client"
        )
    if not isinstance(kind, str):
        raise MalformedMessage(f"message has no 'kind' (got {shorten(kind)})")
    return kind


def _tensors(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> list[torch.Tensor]:
    try:
        return [deserialize_torch_tensor(t) for t in message.tensors]
    except Exception as e:  # hivemind raises assorted errors on bad buffers
        raise MalformedMessage(f"malformed tensor: {shorten(str(e))}") from None


def _request(kind: str, fields: Mapping[str, Any], tensors: Sequence[torch.Tensor] = ()):
    return runtime_pb2.ExpertRequest(
        metadata=_pack(kind, fields), tensors=[serialize_torch_tensor(t) for t in tensors]
    )


def _response(kind: str, fields: Mapping[str, Any], tensors: Sequence[torch.Tensor] = ()):
    return runtime_pb2.ExpertResponse(
        metadata=_pack(kind, fields), tensors=[serialize_torch_tensor(t) for t in tensors]
    )


def _expect(meta: Mapping[str, Any], kind: str) -> None:
    got = kind_of(meta)
    if got != kind:
        raise MalformedMessage(f"expected a {kind!r} message, got {shorten(got)}")


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """Opens one inference stream over blocks ``[start, end)`` of ``model_id``."""

    KIND: ClassVar[str] = "open"
    model_id: str
    stream_id: str  # fresh per stream; the peer keys sessions by (client peer id, stream id)
    nonce: bytes  # fresh per stream; every signature of the stream covers it
    start: int
    end: int
    max_length: int
    batch: int = 1
    pad_lengths: tuple[int, ...] | None = None  # left padding of each row
    wire_dtype: str = "float32"
    protocol: tuple[int, int] = PROTOCOL_VERSION

    def encode(self) -> runtime_pb2.ExpertRequest:
        return _request(
            self.KIND,
            {
                "protocol": list(self.protocol),
                "model_id": self.model_id,
                "stream_id": self.stream_id,
                "nonce": self.nonce,
                "start": self.start,
                "end": self.end,
                "max_length": self.max_length,
                "batch": self.batch,
                "pad_lengths": list(self.pad_lengths) if self.pad_lengths is not None else None,
                "wire_dtype": self.wire_dtype,
            },
        )

    @classmethod
    def decode(cls, meta: Mapping[str, Any]) -> Open:
        _expect(meta, cls.KIND)
        protocol = _version(meta)
        check_version(protocol, "the client")
        return cls(
            model_id=_str(meta, "model_id"),
            stream_id=_str(meta, "stream_id"),
            nonce=_bytes(meta, "nonce", MIN_NONCE, MAX_NONCE),
            start=_int(meta, "start"),
            end=_int(meta, "end"),
            max_length=_int(meta, "max_length"),
            batch=_int(meta, "batch"),
            pad_lengths=_int_list(meta, "pad_lengths"),
            wire_dtype=_str(meta, "wire_dtype"),
            protocol=protocol,
        )


@dataclass(frozen=True)
class Opened:
    """The peer took the stream; a client must keep every message within these limits."""

    KIND: ClassVar[str] = "opened"
    version: str  # the peer's software version
    max_tokens: int  # tokens (per row) of one step
    max_bytes: int  # bytes of one message
    protocol: tuple[int, int] = PROTOCOL_VERSION

    def encode(self) -> runtime_pb2.ExpertResponse:
        return _response(
            self.KIND,
            {
                "protocol": list(self.protocol),
                "version": self.version,
                "max_tokens": self.max_tokens,
                "max_bytes": self.max_bytes,
            },
        )

    @classmethod
    def decode(cls, meta: Mapping[str, Any]) -> Opened:
        _expect(meta, cls.KIND)
        protocol = _version(meta)
        check_version(protocol, "the peer")
        return cls(
            version=_str(meta, "version"),
            max_tokens=_int(meta, "max_tokens", 1),
            max_bytes=_int(meta, "max_bytes", 1),
            protocol=protocol,
        )


@dataclass(frozen=True)
class Step:
    """A chunk of new tokens at ``position`` (``tensors``: ``[hidden, *extra]``)."""

    KIND: ClassVar[str] = "step"
    position: int
    step: int  # per-stream message counter, from 1
    tensors: tuple[torch.Tensor, ...]

    def encode(self) -> runtime_pb2.ExpertRequest:
        return _request(self.KIND, {"position": self.position, "step": self.step}, self.tensors)

    @classmethod
    def decode(cls, meta: Mapping[str, Any], message: runtime_pb2.ExpertRequest) -> Step:
        _expect(meta, cls.KIND)
        return cls(_int(meta, "position"), _int(meta, "step", 1), tuple(_tensors(message)))


@dataclass(frozen=True)
class Forward:
    """A stateless run of whole sequences ``tensors[0]`` through ``[start, end)``."""

    KIND: ClassVar[str] = "forward"
    model_id: str
    nonce: bytes  # fresh per call; the signature covers it
    start: int
    end: int
    wire_dtype: str
    tensors: tuple[torch.Tensor, ...]
    pad_lengths: tuple[int, ...] | None = None
    protocol: tuple[int, int] = PROTOCOL_VERSION

    def encode(self) -> runtime_pb2.ExpertRequest:
        fields = {
            "protocol": list(self.protocol),
            "model_id": self.model_id,
            "nonce": self.nonce,
            "start": self.start,
            "end": self.end,
            "wire_dtype": self.wire_dtype,
            "pad_lengths": list(self.pad_lengths) if self.pad_lengths is not None else None,
        }
        return _request(self.KIND, fields, self.tensors)

    @classmethod
    def decode(cls, meta: Mapping[str, Any], message: runtime_pb2.ExpertRequest) -> Forward:
        _expect(meta, cls.KIND)
        protocol = _version(meta)
        check_version(protocol, "the client")
        return cls(
            model_id=_str(meta, "model_id"),
            nonce=_bytes(meta, "nonce", MIN_NONCE, MAX_NONCE),
            start=_int(meta, "start"),
            end=_int(meta, "end"),
            wire_dtype=_str(meta, "wire_dtype"),
            tensors=tuple(_tensors(message)),
            pad_lengths=_int_list(meta, "pad_lengths"),
            protocol=protocol,
        )


TIMING_FIELDS = ("compute_ms", "queue_ms", "peer_ms", "batch")


@dataclass(frozen=True)
class Reply:
    """A signed output. ``timing`` (``TIMING_FIELDS``) is informational and not signed."""

    KIND: ClassVar[str] = "reply"
    position: int
    step: int
    signature: bytes
    output: torch.Tensor
    timing: Mapping[str, float] = field(default_factory=dict)

    def encode(self) -> runtime_pb2.ExpertResponse:
        fields = {"position": self.position, "step": self.step, "signature": self.signature}
        return _response(self.KIND, {**fields, **self.timing}, [self.output])

    @classmethod
    def decode(cls, meta: Mapping[str, Any], message: runtime_pb2.ExpertResponse) -> Reply:
        _expect(meta, cls.KIND)
        tensors = _tensors(message)
        if len(tensors) != 1:
            raise MalformedMessage(f"a reply carries one tensor, got {len(tensors)}")
        signature = meta.get("signature")
        return cls(
            _int(meta, "position"),
            _int(meta, "step"),
            signature if isinstance(signature, bytes) else b"",
            tensors[0],
            {key: _float(meta, key) for key in TIMING_FIELDS},
        )


@dataclass(frozen=True)
class Error:
    KIND: ClassVar[str] = "error"
    message: str
    code: str = ErrorCode.INTERNAL

    def encode(self) -> runtime_pb2.ExpertResponse:
        return _response(self.KIND, {"message": self.message, "code": self.code})

    @classmethod
    def decode(cls, meta: Mapping[str, Any]) -> Error:
        message, code = meta.get("message"), meta.get("code")
        return cls(
            message[: 4 * MAX_ECHO] if isinstance(message, str) else shorten(message),
            code if isinstance(code, str) and len(code) <= 32 else ErrorCode.INTERNAL,
        )


@dataclass(frozen=True)
class Info:
    KIND: ClassVar[str] = "info"
    protocol: tuple[int, int] = PROTOCOL_VERSION

    def encode(self) -> runtime_pb2.ExpertRequest:
        return _request(self.KIND, {"protocol": list(self.protocol)})


@dataclass(frozen=True)
class InfoReply:
    """What a peer serves, its state and limits (a ping's answer)."""

    KIND: ClassVar[str] = "info_reply"
    model_id: str
    start: int
    end: int
    version: str  # the peer's software version
    torch: str
    dtype: str
    device: str
    quant: str
    decode_steps_per_s: float
    state: str
    public_name: str
    adapters: tuple[str, ...]
    cache_tokens_left: int
    sessions: int  # open sessions
    max_tokens: int
    max_bytes: int
    protocol: tuple[int, int] = PROTOCOL_VERSION

    def encode(self) -> runtime_pb2.ExpertResponse:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "KIND"}
        fields["protocol"], fields["adapters"] = list(self.protocol), list(self.adapters)
        return _response(self.KIND, fields)

    @classmethod
    def decode(cls, meta: Mapping[str, Any]) -> InfoReply:
        _expect(meta, cls.KIND)
        return cls(
            model_id=_str(meta, "model_id"),
            start=_int(meta, "start"),
            end=_int(meta, "end"),
            version=_str(meta, "version", empty=True),
            torch=_str(meta, "torch", empty=True),
            dtype=_str(meta, "dtype"),
            device=_str(meta, "device"),
            quant=_str(meta, "quant"),
            decode_steps_per_s=_float(meta, "decode_steps_per_s"),
            state=_str(meta, "state"),
            public_name=_str(meta, "public_name", empty=True),
            adapters=_str_list(meta, "adapters"),
            cache_tokens_left=_int(meta, "cache_tokens_left"),
            sessions=_int(meta, "sessions"),
            max_tokens=_int(meta, "max_tokens", 1),
            max_bytes=_int(meta, "max_bytes", 1),
            protocol=_version(meta),
        )


CLOSE = runtime_pb2.ExpertRequest()  # an empty message ends an inference session


def is_close(message: runtime_pb2.ExpertRequest) -> bool:
    return not message.metadata and not message.tensors


def decode_reply(
    message: runtime_pb2.ExpertResponse,
    expected: type[Reply | Opened | InfoReply],
    peer_id: str = "",
):
    """A reply of type ``expected``; raises ``RemoteError`` for an ``Error`` reply (from
    ``peer_id``) and ``MalformedMessage`` for anything else."""
    meta = unpack_meta(message.metadata)
    if meta.get("kind") == Error.KIND:
        error = Error.decode(meta)
        raise RemoteError(error.message, error.code, peer_id)
    if expected is Reply:
        return Reply.decode(meta, message)
    return expected.decode(meta)


# --- the RPC interface ------------------------------------------------------------------------


class SwarmRPC(ServicerBase):
    """The peer's RPC interface: the peer implements it, a client calls it through ``stub``."""

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        name = f"{_HANDLER_CLASS}.{method_name}"
        return f"{namespace}::{name}" if namespace is not None else name

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """``Info`` → ``InfoReply``."""
        raise NotImplementedError

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One ``Forward`` → one ``Reply``."""
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator, as hivemind expects

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """``Open``, then ``Step``s, each answered; an empty message ends the session."""
        raise NotImplementedError
        yield  # pragma: no cover


def stub(p2p, peer_id):
    """A client's handle on a peer's ``SwarmRPC`` (``peer_id``: a hivemind ``PeerID``)."""
    return SwarmRPC.get_stub(p2p, peer_id, namespace=SERVICER_NAMESPACE)
