"""Limits on what a peer accepts, and the checks that enforce them.

Every check raises ``InvalidRequest`` with a message that names the problem, so the peer can
answer the offending client and keep serving everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmllm import protocol
from swarmllm.protocol import WIRE_DTYPES, MalformedMessage, shorten


class InvalidRequest(MalformedMessage):
    """A request that breaks the protocol or a limit; the message is sent back to the client."""


@dataclass(frozen=True)
class RequestLimits:
    max_message_bytes: int = 64 * 1024**2
    max_tokens_per_message: int = 4096
    max_session_length: int = 8192
    max_batch: int = 16
    max_sessions_per_peer: int = 8  # per remote peer id
    # cache tokens one client may reserve, all its sessions together (None: half the budget)
    max_cache_tokens_per_peer: int | None = None
    max_forward_tokens: int = 4096  # rows x tokens of one stateless forward
    max_forwards_per_peer: int = 1  # stateless forwards one client may have running at once
    session_idle_timeout: float = 300.0  # seconds a session may wait for its next step
    max_session_lifetime: float = 3600.0  # seconds a session may stay open in all


def check_message_size(num_bytes: int, limits: RequestLimits) -> None:
    protocol.check_message_size(num_bytes, limits.max_message_bytes)


def wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise InvalidRequest(
            f"unsupported wire dtype {shorten(name)}; use one of {sorted(WIRE_DTYPES)}"
        )
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
            "hidden states must have rank 3 [batch, tokens, hidden], got "
            f"{shorten(list(hidden.shape))}"
        )
    rows, tokens, width = hidden.shape
    if width != hidden_size:
        raise InvalidRequest(f"hidden size {width} does not match the model's {hidden_size}")
    if tokens == 0 or rows == 0:
        raise InvalidRequest(f"hidden states are empty (shape {shorten(list(hidden.shape))})")
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


def check_range(name: str, value: int, low: int, high: int) -> int:
    """An integer field (already typed by the protocol) within ``[low, high]``."""
    if not low <= value <= high:
        raise InvalidRequest(f"field {name!r} = {value} is outside [{low}, {high}]")
    return value


def check_pad_lengths(
    pads: tuple[int, ...] | None, batch: int, max_pad: int
) -> torch.Tensor | None:
    """Left padding per row as a tensor (None when no row is padded): one entry per row, each
    below ``max_pad`` (at least one real token per row)."""
    if pads is None:
        return None
    if len(pads) != batch:
        raise InvalidRequest(f"'pad_lengths' has {len(pads)} entries for a batch of {batch}")
    if any(p >= max_pad for p in pads):
        raise InvalidRequest(f"'pad_lengths' must be non-negative and below {max_pad}")
    return torch.tensor(pads) if any(pads) else None


def check_image_inputs(
    features: torch.Tensor,
    positions: torch.Tensor,
    *,
    feature_dim: int,
    dtype: torch.dtype,
    batch: int,
    position: int,
    num_tokens: int,
) -> None:
    """Image features [images, tokens, feature_dim] and their placeholder positions
    [images, tokens] for a message of ``num_tokens`` tokens starting at ``position``.

    The count of placeholder positions must match the features one for one, each must fall
    inside the message, and none may repeat. Their number is bounded by the message's tokens.
    """
    if batch != 1:
        raise InvalidRequest(f"image input needs a batch of one row, the session has {batch}")
    if features.dtype != dtype:
        raise InvalidRequest(
            f"image features have dtype {features.dtype}, the session uses {dtype}"
        )
    if features.ndim != 3 or features.shape[0] == 0 or features.shape[1] == 0:
        raise InvalidRequest(
            "image features must have shape [images, tokens, features], got "
            f"{shorten(list(features.shape))}"
        )
    if features.shape[2] != feature_dim:
        raise InvalidRequest(
            f"image feature size {features.shape[2]} does not match the adapter's {feature_dim}"
        )
    if positions.dtype != torch.int64 or tuple(positions.shape) != tuple(features.shape[:2]):
        raise InvalidRequest(
            f"image positions must be int64 of shape {list(features.shape[:2])} (one per "
            f"feature vector), got {positions.dtype} {shorten(list(positions.shape))}"
        )
    if not torch.isfinite(features).all():
        raise InvalidRequest("image features contain NaN or Inf values")
    flat = positions.flatten()
    if flat.min() < position or flat.max() >= position + num_tokens:
        raise InvalidRequest(
            f"image positions must lie in this message's tokens [{position}, "
            f"{position + num_tokens}), got {flat.min().item()}..{flat.max().item()}"
        )
    if flat.unique().numel() != flat.numel():
        raise InvalidRequest("image positions repeat")
