"""Attention masks and position ids for a chunk of new tokens appended after a cache.

SDPA's ``is_causal`` aligns its mask top-left, which is only right when nothing is cached; a
chunk of several tokens after a non-empty cache, left-padded rows, or a sliding window need an
explicit mask. Rows may be left-padded (batched prompts of different lengths): padding tokens
are never attended to, and real tokens are numbered from 0 as transformers' ``generate`` does.
"""

from __future__ import annotations

import torch


def position_ids(
    batch: int,
    past_length: int,
    num_new: int,
    pad_lengths: torch.Tensor | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotary positions [batch, num_new] of the new tokens (padding tokens clamp to 0)."""
    positions = torch.arange(past_length, past_length + num_new, device=device)
    positions = positions.expand(batch, num_new)
    if pad_lengths is None:
        return positions
    return (positions - pad_lengths[:, None]).clamp(min=0)


def attention_mask(
    batch: int,
    past_length: int,
    num_new: int,
    pad_lengths: torch.Tensor | None = None,
    window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask [batch, 1, num_new, past+num_new] (True = attend) on ``device``, or None
    when SDPA's built-in causal mask is already exact."""
    total = past_length + num_new
    window_matters = window is not None and total > window
    if pad_lengths is None and not window_matters and (past_length == 0 or num_new == 1):
        return None
    query = torch.arange(past_length, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if window_matters:
        allowed = allowed & (query - key < window)
    allowed = allowed.expand(batch, num_new, total)
    if pad_lengths is not None:
        not_padding = key[None] >= pad_lengths[:, None, None]
        is_self = key[None] == query[None]  # a padding query must see something, or SDPA gives NaN
        allowed = (allowed & not_padding) | is_self
    return allowed[:, None]


def decode_positions(past_lengths: torch.Tensor, pad_lengths: torch.Tensor) -> torch.Tensor:
    """Rotary positions [rows, 1] of one new token per row after ``past_lengths`` [rows] tokens."""
    return (past_lengths - pad_lengths).clamp(min=0)[:, None]


def decode_mask(
    past_lengths: torch.Tensor,
    pad_lengths: torch.Tensor,
    window: int | None = None,
    num_keys: int | None = None,
) -> torch.Tensor:
    """Boolean mask [rows, 1, 1, max(past)+1] for one new token per row, where row ``r`` has
    ``past_lengths[r]`` cached tokens and its keys are right-padded to the longest row.

    Row ``r`` attends to its own keys ``0..past[r]`` (the new token is key ``past[r]``), never
    to its left padding nor to the right padding that lines the rows up. ``num_keys``
    (max(past)+1) saves reading the maximum back from an accelerator.
    """
    if num_keys is None:
        num_keys = int(past_lengths.max()) + 1
    key = torch.arange(num_keys, device=past_lengths.device)[None, :]
    past = past_lengths[:, None]
    allowed = (key <= past) & ((key >= pad_lengths[:, None]) | (key == past))
    if window is not None:
        allowed = allowed & (past - key < window)
    return allowed[:, None, None, :]
