"""Speculative decoding's pure parts: prompt-lookup drafts, the draft length, and the acceptance
rule, whose output distribution is checked statistically (fixed seeds, so never by chance)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from swarmllm.client.drafting import DraftLength, PromptLookup, check_speculative
from swarmllm.client.generation import GenerationConfig
from swarmllm.client.sampling import SamplingParams, TokenSampler, accept_or_resample

DRAWS = 200_000
P = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double()


def _fits(counts: torch.Tensor, p: torch.Tensor) -> float:
    """The chi-square p-value of ``counts`` against ``p`` (over tokens of non-zero mass)."""
    support = p > 0
    assert counts[~support].sum() == 0, "a token of zero probability was produced"
    mass = p[support].double()
    expected = mass / mass.sum() * counts.sum()
    return float(chisquare(counts[support].numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("draft", [0, 2, 4, 5])  # likeliest, middling, rare, impossible
def test_the_acceptance_rule_keeps_the_distribution_whatever_the_draft(draft: int) -> None:
    generator = torch.Generator().manual_seed(draft)
    probs = P.expand(DRAWS, -1)
    tokens, accepted = accept_or_resample(probs, torch.full((DRAWS,), draft), generator)
    assert _fits(_frequencies(tokens, len(P)), P) > 1e-3
    # the draft is accepted with probability p(draft) (standard error ~1e-3 at these draws)
    assert abs(accepted.double().mean().item() - P[draft].item()) < 5e-3
    assert torch.equal(tokens[accepted], torch.full_like(tokens[accepted], draft))


def test_the_statistical_check_rejects_a_rule_that_favours_drafts() -> None:
    """The check above has power: a rule biased towards the draft (accept it when it is the
    likeliest token, else sample) fails it at the same number of draws."""
    generator = torch.Generator().manual_seed(7)
    probs = P.expand(DRAWS, -1)
    # accept a draft with probability sqrt(p): a mild bias
    draft = torch.full((DRAWS,), 1)
    keep = torch.rand(DRAWS, generator=generator) < P[1].sqrt()
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    biased = torch.where(keep, draft, sampled)
    assert _fits(_frequencies(biased, len(P)), P) < 1e-6


def test_a_draft_holding_all_the_mass_is_always_accepted() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0]]).expand(1000, -1)
    tokens, accepted = accept_or_resample(
        probs, torch.ones(1000, dtype=torch.long), torch.Generator().manual_seed(0)
    )
    assert accepted.all() and (tokens == 1).all()


def test_verified_tokens_follow_the_processed_distribution_at_every_position() -> None:
    """Two draft positions through ``TokenSampler.verify`` with temperature and top-k: the first
    token's distribution, and the second's given an accepted first draft, are those the
    processors give at their positions."""
    vocab, rows = 6, 100_000
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0, 1.5], [0.3, 0.1, 2.0, 1.0, -0.5, 0.8]])
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=4, seed=11)
    sampler = TokenSampler(params)
    context = torch.zeros(rows, 3, dtype=torch.long)
    drafts = torch.tensor([[1, 2]]).expand(rows, -1)
    batch_logits = torch.cat([logits, logits[:1]])[None].expand(rows, -1, -1)
    tokens, accepted = sampler.verify(context, batch_logits, drafts)
    expected = [
        torch.softmax(sampler.processors(context[:1], logits[i : i + 1].clone())[0], -1)
        for i in range(2)
    ]
    assert _fits(_frequencies(tokens[:, 0], vocab), expected[0]) > 1e-3
    second = tokens[accepted >= 1, 1]
    assert second.numel() > 10_000
    assert _fits(_frequencies(second, vocab), expected[1]) > 1e-3
    assert (tokens[accepted == 0, 1:] == -1).all()  # nothing after a rejection


def test_greedy_verification_equals_token_by_token_decoding_with_a_repetition_penalty() -> None:
    """The processors see the drafts before each position: here the penalty on the drafted
    token 3 makes token 4 the choice at the second position, as step-by-step decoding does."""
    sampler = TokenSampler(SamplingParams(repetition_penalty=3.0))
    context = torch.tensor([[0, 1, 2]])
    logits = torch.tensor([[[0.0, 0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 0.0, 2.0, 1.0], [1.0] * 5]])
    tokens, accepted = sampler.verify(context, logits, torch.tensor([[3, 3]]))
    first = sampler(context, logits[:, 0].clone())
    second = sampler(torch.cat([context, first[:, None]], 1), logits[:, 1].clone())
    assert tokens[0, :2].tolist() == [first.item(), second.item()] == [3, 4]
    assert accepted.tolist() == [1]


def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    tokens = torch.tensor([5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 6, 7])
    assert lookup.propose(tokens, 4).tolist() == [2, 3, 4, 6]  # "6 7" last seen before "2 3"
    assert lookup.propose(tokens, 2).tolist() == [2, 3]
    assert lookup.propose(torch.tensor([1, 2, 3, 1, 2, 3]), 8).tolist() == [1, 2, 3]
    assert lookup.propose(torch.tensor([1, 2, 3, 4, 5]), 4).numel() == 0  # no repeated pair
    assert lookup.propose(torch.tensor([1, 2, 1]), 4).numel() == 0  # one token is no match
    assert lookup.propose(tokens, 0).numel() == 0


def test_the_draft_length_adapts_within_its_bounds() -> None:
    length = DraftLength(low=1, high=8, first=4)
    for _ in range(5):
        length.update(length.current, length.current)
    assert length.current == 8
    for _ in range(20):
        length.update(length.current, 0)
    assert length.current == 1
    length.update(0, 0)  # no draft: no change
    assert length.current == 1


def test_speculative_modes_are_checked() -> None:
    assert check_speculative("lookup") == "lookup"
    assert check_speculative("draft") == "draft"  # whether a draft model is loaded: unknown
    assert check_speculative("draft", has_draft_model=True) == "draft"
    with pytest.raises(ValueError, match=r"'draft' needs a draft model.*--draft-model REF"):
        check_speculative("draft", has_draft_model=False)
    with pytest.raises(ValueError, match="off, lookup, draft"):
        GenerationConfig.build(
            type("Defaults", (), {"eos_token_id": None, "pad_token_id": 0}), speculative="fast"
        )
