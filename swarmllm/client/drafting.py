"""Draft tokens for speculative decoding, and how many to propose per round.

Drafts come from the context (``lookup``, below) or from a small local model (``draft``,
``client/draft_model.py``); both propose a deterministic continuation.

Prompt lookup (no extra model): the last few tokens of the context are looked up earlier in the
context, and the tokens that followed their most recent earlier occurrence are the draft. Text
that copies from its context (rewriting, summarising, code edits, repetitive output) gets long
drafts accepted; free text rarely finds a match and then decodes exactly as without drafts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads the modes before it imports torch
    import torch

SPECULATIVE_MODES = ("off", "lookup", "draft")
MAX_NGRAM, MIN_NGRAM = 3, 2  # a single-token match is too often chance to be worth a draft
MIN_DRAFT, MAX_DRAFT, FIRST_DRAFT = 1, 8, 4


def check_speculative(mode: str, has_draft_model: bool | None = None) -> str:
    """``mode`` if it names a way to speculate and, when ``has_draft_model`` is known, this
    client can speculate that way; a clear error otherwise."""
    if mode not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {mode!r}")
    if mode == "draft" and has_draft_model is False:
        raise ValueError(
            "speculative mode 'draft' needs a draft model: a small model with the same "
            "tokenizer, given as --draft-model REF (Python: from_pretrained(..., "
            "draft_model=REF)); or use 'lookup' (drafts from the context, no extra model)"
        )
    return mode


class PromptLookup:
    """Drafts the continuation of the most recent earlier occurrence of the context's last
    ``max_ngram`` .. ``min_ngram`` tokens (longest match first)."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: torch.Tensor, limit: int) -> torch.Tensor:
        """Up to ``limit`` draft tokens (1-D, maybe empty) to follow ``tokens`` (1-D)."""
        if limit < 1:
            return tokens[:0]
        for size in range(self.max_ngram, self.min_ngram - 1, -1):
            if tokens.shape[0] <= size:
                continue
            earlier = tokens.unfold(0, size, 1)[:-1]  # every window but the suffix itself
            hits = (earlier == tokens[-size:]).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + size  # the continuation is never empty
                return tokens[start : start + limit]
        return tokens[:0]


class DraftLength:
    """How many tokens to draft next: two more after a round that accepted every draft, one
    fewer after a rejection, within ``[low, high]`` (the heuristic transformers' assisted
    generation uses)."""

    def __init__(self, low: int = MIN_DRAFT, high: int = MAX_DRAFT, first: int = FIRST_DRAFT):
        if not 1 <= low <= first <= high:
            raise ValueError(f"need 1 <= low <= first <= high, got {low}, {first}, {high}")
        self.low, self.high, self.current = low, high, first

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return  # no match: says nothing about how well drafts do
        if accepted == drafted:
            self.current = min(self.high, self.current + 2)
        else:
            self.current = max(self.low, self.current - 1)


@dataclass
class SpeculationStats:
    """Counts over a session's generations: rounds (steps through the swarm, each giving at
    least one new token), tokens drafted and drafts accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def format(self) -> str:
        rate = f" ({100 * self.accepted / self.drafted:.0f}%)" if self.drafted else ""
        return f"{self.rounds} rounds, {self.accepted}/{self.drafted} drafts accepted{rate}"
