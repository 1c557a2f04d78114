"""Limits on what a peer accepts, and the checks that enforce them.

Every check raises ``InvalidRequest`` with a message that names the problem, so the peer can
answer the offending client and keep serving everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmllm.protocol import WIRE_DTYPES


class InvalidRequest(ValueError):
    """A request that breaks the protocol or a limit; the message is sent back to the client."""


@dataclass(frozen=True)
class RequestLimits:
    max_message_bytes: int = 64 * 1024**2
    max_tokens_per_message: int = 4096
    max_session_length: int = 8192
    max_batch: int = 16
    max_sessions_per_peer: int = 8  # per remote peer id


def check_message_size(num_bytes: int, limits: RequestLimits) -> None:
    if num_bytes > limits.max_message_bytes:
        raise InvalidRequest(
            f"message of {num_bytes} bytes exceeds the limit of {limits.max_message_bytes} bytes"
        )


def wire_dtype(name: object) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise InvalidRequest(f"unsupported wire dtype {name!r}; use one of {sorted(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def check_hidden_states(
    hidden: torch.Tensor,
    *,
    hidden_size: int,
    dtype: torch.dtype,
    batch: int | None,
    limits: RequestLimits,
) -> None:
    """Shape, dtype, size and finiteness of a [batch, tokens, hidden_size] activation tensor."""
    if hidden.dtype != dtype:
        raise InvalidRequest(f"hidden states have dtype {hidden.dtype}, the session uses {dtype}")
    if hidden.ndim != 3:
        raise InvalidRequest(
            f"hidden states must have rank 3 [batch, tokens, hidden], got {list(hidden.shape)}"
        )
    rows, tokens, width = hidden.shape
    if width != hidden_size:
        raise InvalidRequest(f"hidden size {width} does not match the model's {hidden_size}")
    if tokens == 0 or rows == 0:
        raise InvalidRequest(f"hidden states are empty (shape {list(hidden.shape)})")
    if batch is not None and rows != batch:
        raise InvalidRequest(f"batch of {rows} rows does not match the session's {batch}")
    if rows > limits.max_batch:
        raise InvalidRequest(f"batch of {rows} rows exceeds the limit of {limits.max_batch}")
    if tokens > limits.max_tokens_per_message:
        raise InvalidRequest(
            f"{tokens} tokens in one message exceed the limit of {limits.max_tokens_per_message}"
        )
    if not torch.isfinite(hidden).all():
        raise InvalidRequest("hidden states contain NaN or Inf values")


def check_int(meta: dict, key: str, low: int, high: int) -> int:
    """An integer field of the metadata within ``[low, high]``."""
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"field {key!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(f"field {key!r} = {value} is outside [{low}, {high}]")
    return value


def check_str(meta: dict, key: str, max_length: int = 256) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise InvalidRequest(
            f"field {key!r} must be a non-empty string of at most {max_length} chars"
        )
    return value
