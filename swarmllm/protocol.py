"""The wire format shared by peers and clients: one module, imported by both sides.

Every RPC message is a hivemind ``ExpertRequest``/``ExpertResponse``: msgpack metadata plus
tensors serialized by hivemind. Tensors travel in the session's wire dtype exactly as they will
be digested and signed, so the bytes a peer signs are the bytes the client checks.

Inference stream, client → peer:
  1. ``{"open": {model_id, session_id, start, end, max_length, batch, pad_lengths, wire_dtype}}``
     answered by ``{"opened": true, "peer_version": ...}`` or an error;
  2. ``{"position": p, "step": k}`` + ``[hidden, *extra]`` for each chunk of new tokens, answered by
     ``{"position": p, "step": k, "signature": ...}`` + ``[output]``;
  3. an empty message (or closing the stream) ends the session.
``*extra`` is empty, or, in a message to a first hop serving the vision adapter, the image input
``[features [images, tokens, feature_dim], positions [images, tokens] int64]``: the features the
adapter projects and the absolute token positions (batch row 0) they replace
(``swarmllm.blocks.vision``). The signed input digest covers ``[hidden, *extra]``.
Any reply may instead be ``{"error": text, "code": code}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# The servicer's handler names (hivemind prefixes them with the servicer class name).
SERVICER_NAMESPACE = "swarmllm"


class ErrorCode:
    BUSY = "busy"  # no room for the session: route elsewhere, the peer is healthy
    INVALID = "invalid"  # the request is malformed or violates a limit
    UNAVAILABLE = "unavailable"  # the peer is not serving (joining, leaving, wrong model)
    FORBIDDEN = "forbidden"  # a private peer that does not serve this client
    INTERNAL = "internal"


class RemoteError(RuntimeError):
    """An error reply from a peer."""

    def __init__(self, message: str, code: str = ErrorCode.INTERNAL, peer_id: str = ""):
        super().__init__(f"{peer_id}: {message}" if peer_id else message)
        self.code, self.peer_id, self.reason = code, peer_id, message


def encode_request(
    meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()
) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        metadata=msgpack.packb(meta), tensors=[serialize_torch_tensor(t) for t in tensors]
    )


def encode_response(
    meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()
) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        metadata=msgpack.packb(meta), tensors=[serialize_torch_tensor(t) for t in tensors]
    )


def error_response(message: str, code: str) -> runtime_pb2.ExpertResponse:
    return encode_response({"error": message, "code": code})


def decode_meta(raw: bytes) -> dict[str, Any]:
    """Metadata of a message; raises ValueError when it is not a msgpack map."""
    if not raw:
        return {}
    try:
        meta = msgpack.unpackb(raw, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"metadata is not valid msgpack: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a map, got {type(meta).__name__}")
    return meta


def decode_tensors(
    message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse,
) -> list[torch.Tensor]:
    """Deserialize a message's tensors; raises ValueError on a malformed tensor."""
    try:
        return [deserialize_torch_tensor(t) for t in message.tensors]
    except Exception as e:  # hivemind raises assorted errors on bad buffers
        raise ValueError(f"malformed tensor: {e}") from e


def raise_if_error(meta: dict[str, Any], peer_id: str) -> None:
    if "error" in meta:
        raise RemoteError(str(meta["error"]), str(meta.get("code", ErrorCode.INTERNAL)), peer_id)
