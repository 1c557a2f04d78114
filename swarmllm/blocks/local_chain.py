"""A model's spans chained in one process: the reference engine for the demo and the benchmark.

It does what the distributed client does (embed, run span after span with a cache per span,
LM head, greedy pick) with every span in this process, so it is also the baseline that the
swarm is measured against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from swarmllm.blocks.families import family_of
from swarmllm.blocks.head import ModelHead
from swarmllm.blocks.kv_cache import KVCache
from swarmllm.blocks.span import BlockSpan

if TYPE_CHECKING:
    from swarmllm.blocks.sources import ModelSource


def span_bounds(
    num_blocks: int, splits: Sequence[int] | None = None, num_spans: int = 3
) -> list[tuple[int, int]]:
    """``[start, end)`` of each span: cut at ``splits``, or into ``num_spans`` near-equal spans."""
    if splits is None:
        if not 1 <= num_spans <= num_blocks:
            raise ValueError(f"cannot cut {num_blocks} blocks into {num_spans} spans")
        splits = [round(i * num_blocks / num_spans) for i in range(1, num_spans)]
    cuts = [0, *splits, num_blocks]
    if any(a >= b for a, b in pairwise(cuts)):
        raise ValueError(
            f"split points {list(splits)} must increase strictly between 0 and {num_blocks}"
        )
    return list(pairwise(cuts))


class LocalChain:
    """The client's head plus every span of the model, run one after the other in-process."""

    def __init__(self, head: ModelHead, spans: Sequence[BlockSpan]):
        self.head = head
        self.spans = list(spans)

    @classmethod
    def load(
        cls,
        source: ModelSource,
        splits: Sequence[int] | None = None,
        num_spans: int = 3,
        dtype: torch.dtype = torch.float32,
    ) -> LocalChain:
        config = source.config
        family_of(config)  # refuse an unsupported architecture before reading any weights
        bounds = span_bounds(config.num_hidden_layers, splits, num_spans)
        files = source.weight_files()
        head = ModelHead.from_weights(config, files, dtype)
        spans = [BlockSpan.from_weights(config, files, start, end, dtype) for start, end in bounds]
        return cls(head, spans)

    def new_caches(self) -> list[KVCache]:
        """One empty cache per span: the state of one generation session."""
        return [span.new_cache() for span in self.spans]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        caches: Sequence[KVCache] | None = None,
        pad_lengths: torch.Tensor | None = None,
        span_seconds: list[float] | None = None,
    ) -> torch.Tensor:
        """The last span's output [batch, new, hidden] for ``input_ids`` [batch, new].

        The tokens follow those already in ``caches`` (which advance); each span's wall time
        is added to ``span_seconds`` when given.
        """
        return self.run_spans(self.head.embed(input_ids), caches, pad_lengths, span_seconds)

    def run_spans(
        self,
        hidden: torch.Tensor,
        caches: Sequence[KVCache] | None = None,
        pad_lengths: torch.Tensor | None = None,
        span_seconds: list[float] | None = None,
    ) -> torch.Tensor:
        """Embedded tokens [batch, new, hidden] through every span (see ``hidden_states``)."""
        caches = caches if caches is not None else [None] * len(self.spans)
        for index, (span, cache) in enumerate(zip(self.spans, caches, strict=True)):
            started = time.perf_counter()
            hidden = span(hidden, cache, pad_lengths)
            if span_seconds is not None:
                span_seconds[index] += time.perf_counter() - started
        return hidden

    def logits(
        self,
        input_ids: torch.Tensor,
        caches: Sequence[KVCache] | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, new, vocab] of every new token (see ``hidden_states``)."""
        return self.head.logits(self.hidden_states(input_ids, caches, pad_lengths))

    @torch.inference_mode()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> tuple[list[int], list[float]]:
        """Greedy continuation of one prompt ([new] or [1, new]).

        Returns the new tokens (ending with the EOS token if one was produced) and the seconds
        spent in each span over the whole generation (prefill included).
        """
        prompt = input_ids.reshape(1, -1)
        stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        caches = self.new_caches()
        span_seconds = [0.0] * len(self.spans)
        tokens: list[int] = []
        chunk = prompt
        while len(tokens) < max_new_tokens:
            hidden = self.hidden_states(chunk, caches, span_seconds=span_seconds)
            token = int(self.head.logits(hidden[:, -1]).argmax(-1))
            tokens.append(token)
            if token in stop:
                break
            chunk = prompt.new_tensor([[token]])
        return tokens, span_seconds
