"""The typed wire messages: round trips, versions, and bounds checked before anything is used."""

from __future__ import annotations

import msgpack
import pytest
import torch

from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.hop import (
    MESSAGE_OVERHEAD,
    HopFailure,
    HopStream,
    SessionSpec,
    check_output,
    decode_for,
    reply_max_bytes,
)
from swarmllm.client.routing import Hop
from swarmllm.protocol import (
    MAX_ECHO,
    MAX_METADATA_BYTES,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Forward,
    Info,
    InfoReply,
    MalformedMessage,
    Open,
    Opened,
    RemoteError,
    Reply,
    Step,
    VersionMismatch,
    decode_reply,
    shorten,
    unpack_meta,
)

OPEN = Open("tiny", "stream-1", b"n" * 16, 0, 6, 32, 2, (0, 3), "float32")


def _meta(message) -> dict:
    return unpack_meta(message.metadata)


def test_every_message_round_trips() -> None:
    hidden, output = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert Open.decode(_meta(OPEN.encode())) == OPEN
    opened = Opened("0.1", 4096, 2**26)
    assert decode_reply(opened.encode(), Opened) == opened
    step = Step.decode(_meta(request := Step(4, 2, (hidden,)).encode()), request)
    assert (step.position, step.step) == (4, 2) and torch.equal(step.tensors[0], hidden)
    forward = Forward("tiny", b"f" * 16, 1, 3, "float32", (hidden,), (1, 0))
    decoded = Forward.decode(_meta(request := forward.encode()), request)
    assert decoded.pad_lengths == (1, 0) and decoded.nonce == forward.nonce
    timing = {"compute_ms": 1.5, "queue_ms": 0.0, "peer_ms": 2.0, "batch": 1.0}
    reply = decode_reply(Reply(4, 2, b"s" * 64, output, timing).encode(), Reply)
    assert reply.signature == b"s" * 64 and dict(reply.timing) == timing
    assert torch.equal(reply.output, output)
    info = InfoReply(
        "tiny", 0, 6, "0.1", "2", "float32", "cpu", "none", 3.0, "ONLINE", "", ("a",), 10, 1, 16, 99
    )
    assert decode_reply(info.encode(), InfoReply) == info
    assert _meta(Info().encode())["protocol"] == list(PROTOCOL_VERSION)


def test_an_error_reply_raises_with_its_code() -> None:
    with pytest.raises(RemoteError, match="no room") as error:
        decode_reply(Error("no room", ErrorCode.BUSY).encode(), Opened, "peer-x")
    assert error.value.code == ErrorCode.BUSY and error.value.peer_id == "peer-x"


def test_a_client_of_another_major_version_is_told_so() -> None:
    v1_opening = msgpack.packb({"open": {"model_id": "tiny", "session_id": "s"}})
    with pytest.raises(VersionMismatch, match=r"protocol 1, this peer speaks 2\.0"):
        Open.decode(unpack_meta(v1_opening))
    future = unpack_meta(OPEN.encode().metadata) | {"protocol": [3, 0]}
    with pytest.raises(VersionMismatch, match=r"speaks swarmllm protocol 3\.0"):
        Open.decode(future)
    with pytest.raises(VersionMismatch):  # and a peer of another version, to a client
        Opened.decode(unpack_meta(Opened("9", 1, 1, protocol=(1, 4)).encode().metadata))


def test_metadata_over_the_bound_is_refused_before_it_is_decoded(monkeypatch) -> None:
    huge = msgpack.packb({"kind": "open", "x": list(range(MAX_METADATA_BYTES))})

    def no_decoding(*args, **kwargs):
        raise AssertionError("msgpack must not decode oversized metadata")

    monkeypatch.setattr(msgpack, "unpackb", no_decoding)
    with pytest.raises(MalformedMessage, match=f"exceeds the limit of {MAX_METADATA_BYTES}"):
        unpack_meta(huge)


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("pad_lengths", [2**64 - 1, 0], "non-negative integers"),
        ("pad_lengths", [True, 0], "non-negative integers"),
        ("model_id", _nested(1000), "'model_id' must be a non-empty string"),
        ("model_id", "m" * 60_000, "'model_id' must be a non-empty string"),
        ("max_length", 2**64 - 1, "'max_length' ="),
        ("max_length", 1.5, "'max_length' must be an integer"),
        ("nonce", b"short", "'nonce' must be 16-64 bytes"),
        ("stream_id", None, "'stream_id' must be a non-empty string"),
    ],
)
def test_bad_fields_are_named_and_never_echoed_whole(field, value, words) -> None:
    meta = unpack_meta(OPEN.encode().metadata) | {field: value}
    with pytest.raises(MalformedMessage, match=words) as error:
        Open.decode(unpack_meta(msgpack.packb(meta, use_bin_type=True)))
    assert len(str(error.value)) < 2 * MAX_ECHO + 100


def test_shorten_bounds_huge_and_deep_values() -> None:
    assert len(shorten("x" * 2**24)) <= MAX_ECHO
    assert len(shorten(_nested(5000))) <= MAX_ECHO
    assert shorten("abc") == "'abc'"


def test_a_peer_s_error_text_is_cut_before_the_client_logs_it() -> None:
    reply = Error("e" * 60_000, ErrorCode.INTERNAL).encode()  # within the metadata bound
    with pytest.raises(RemoteError) as error:
        decode_reply(reply, Reply)
    assert len(str(error.value)) < 1000


@pytest.mark.parametrize(
    ("code", "fault"),
    [
        (ErrorCode.INVALID, False),  # the client's own request was bad: never the peer's fault
        (ErrorCode.BUSY, False),
        (ErrorCode.VERSION, False),
        (ErrorCode.EXPIRED, False),
        (ErrorCode.INTERNAL, True),
    ],
)
def test_which_error_replies_blame_the_peer(code: str, fault: bool) -> None:
    hop = Hop("peer", 0, 3)
    with pytest.raises(HopFailure) as failure:
        decode_for(hop, Error("no", code).encode().SerializeToString(), Reply)
    assert failure.value.fault is fault


@pytest.mark.parametrize(
    ("output", "words"),
    [
        (torch.full((1, 2, 4), torch.nan), "NaN or Inf"),
        (torch.full((1, 2, 4), torch.inf), "NaN or Inf"),
        (torch.zeros(1, 3, 4), "shape"),
        (torch.zeros(1, 2, 4, dtype=torch.float16), "shape"),
    ],
)
def test_the_client_blames_the_hop_that_sent_a_bad_output(output, words) -> None:
    hop = Hop("sender", 0, 3)
    with pytest.raises(HopFailure, match=words) as failure:
        check_output(hop, torch.zeros(1, 2, 4), output)
    assert failure.value.fault and failure.value.hop is hop


def _stream_with_limits(max_tokens: int, max_bytes: int = 2**26) -> HopStream:
    stream = HopStream(None, Hop("peer", 0, 3), SessionSpec("m", "s", max_length=100))
    stream.limits = Opened("test", max_tokens, max_bytes)
    return stream


def test_a_long_step_is_cut_into_chunks_within_the_peer_s_limits() -> None:
    hidden = torch.zeros(1, 40, 64)
    assert _stream_with_limits(16)._chunks(hidden, 5, None) == [(5, 21), (21, 37), (37, 45)]
    # 64 floats a token: 4096 bytes over the message overhead fit 16 tokens
    assert _stream_with_limits(1000, MESSAGE_OVERHEAD + 16 * 256)._chunks(hidden, 0, None)[0] == (
        0,
        16,
    )


def test_chunks_never_split_an_image() -> None:
    hidden = torch.zeros(1, 40, 64)
    images = ImageInputs(torch.zeros(1, 6, 8), torch.arange(12, 18)[None])
    assert _stream_with_limits(16)._chunks(hidden, 0, images) == [(0, 12), (12, 28), (28, 40)]
    with pytest.raises(ValueError, match="an image of 6 tokens does not fit"):
        _stream_with_limits(4)._chunks(hidden, 0, images)

    with pytest.raises(ValueError, match="must lie in the step's tokens"):
        outside = ImageInputs(images.features, images.positions + 40)
        _stream_with_limits(16)._chunks(hidden, 0, outside)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_longest_honest_reply_fits_the_client_s_bound(dtype: torch.dtype) -> None:
    hidden = torch.zeros(2, 300, 64, dtype=dtype)
    timing = {"compute_ms": 1e18, "queue_ms": 1e18, "peer_ms": 1e18, "batch": 1e18}
    reply = Reply(2**62, 2**62, b"s" * 64, torch.ones_like(hidden), timing).encode()
    assert reply.ByteSize() <= reply_max_bytes(hidden)
    assert reply_max_bytes(hidden) < 2 * reply.ByteSize() + MAX_METADATA_BYTES
