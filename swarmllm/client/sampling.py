"""Choosing the next token from logits with transformers' own logits processors, and
verifying draft tokens (speculative decoding) so that the output distribution is unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class TokenSampler:
    """Applies the processors and picks tokens; seeded sampling is reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.processors = LogitsProcessorList()
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.do_sample:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k is not None:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, token_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from ``logits`` [batch, vocab] given ``token_ids`` so far."""
        scores = self.processors(token_ids, logits.float())
        if not self.params.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)

    def verify(
        self, token_ids: torch.Tensor, logits: torch.Tensor, drafts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check ``drafts`` [batch, k] that followed ``token_ids`` against the model's
        ``logits`` [batch, k + 1, vocab] at the last context position and at each draft.

        Returns ``tokens`` [batch, k + 1] and ``accepted`` [batch]: row r's output is
        ``tokens[r, : accepted[r] + 1]`` (its first ``accepted[r]`` entries are the accepted
        drafts; entries after that are -1). Position i is processed exactly as ``__call__``
        would after the context plus drafts ``[: i]``; greedy accepts a draft that is the
        argmax, sampling uses the speculative acceptance rule (``accept_or_resample``), so the
        tokens are distributed as without drafts."""
        batch, k = drafts.shape
        tokens = torch.full((batch, k + 1), -1, dtype=torch.long)
        accepted = torch.full((batch,), k, dtype=torch.long)
        undecided = torch.ones(batch, dtype=torch.bool)  # rows with every draft so far accepted
        for i in range(k + 1):
            context = torch.cat([token_ids, drafts[:, :i]], dim=1)
            if i == k:
                tokens[:, i] = torch.where(undecided, self(context, logits[:, i]), -1)
                break
            scores = self.processors(context, logits[:, i].float())
            if self.params.do_sample:
                probs = torch.softmax(scores, dim=-1)
                chosen, ok = accept_or_resample(probs, drafts[:, i], self.generator)
            else:
                chosen = scores.argmax(dim=-1)
                ok = chosen == drafts[:, i]
            tokens[:, i] = torch.where(undecided, chosen, -1)
            accepted = torch.where(undecided & ~ok, i, accepted)
            undecided &= ok
            if not undecided.any():
                break
        return tokens, accepted


def accept_or_resample(
    probs: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative acceptance rule for a deterministic draft (its proposal is one-hot):
    accept draft x with probability p(x), else sample from p without x, renormalised. The
    result is distributed as p whatever x is. ``probs`` [batch, vocab], ``drafts`` [batch];
    returns the tokens [batch] and whether each row accepted its draft."""
    drafted = probs.gather(1, drafts[:, None]).squeeze(1)
    accepted = torch.rand(drafts.shape, generator=generator) < drafted
    residual = probs.scatter(1, drafts[:, None], 0.0)
    # a draft holding all the mass is always accepted; its row's (empty) residual is unused
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, probs)
    resampled = torch.multinomial(residual, num_samples=1, generator=generator).squeeze(1)
    return torch.where(accepted, drafts, resampled), accepted
