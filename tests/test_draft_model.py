"""Drafts from a small local model: its greedy continuation, a cache reused across the rounds'
rewinds, and a draft model with other tokens refused before its weights are read."""

from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from swarmllm.blocks.local_chain import LocalChain
from swarmllm.blocks.sources import ModelSource, ModelSourceError, resolve_model
from swarmllm.client.draft_model import DraftModel
from swarmllm.commands.client_options import speculative_mode
from swarmllm.commands.parsing import UsageError

PROMPT = torch.tensor([3, 17, 5, 99, 42, 8, 61, 17, 5])


@pytest.fixture(scope="module")
def draft_model(llama: ModelSource) -> DraftModel:
    return DraftModel.load(str(llama.path), llama)


def test_drafts_are_the_draft_models_greedy_continuation(draft_model, llama):
    expected, _ = LocalChain.load(llama, num_spans=1).generate_greedy(PROMPT, 6)
    assert draft_model.drafter().propose(PROMPT, 6).tolist() == expected
    assert draft_model.drafter().propose(PROMPT, 0).numel() == 0


def test_a_drafter_feeds_only_what_changed_and_drafts_as_a_fresh_one(draft_model, monkeypatch):
    drafter = draft_model.drafter()
    first = drafter.propose(PROMPT, 4)
    # the swarm kept two drafts and corrected the third: the context goes back into the drafts
    context = torch.cat([PROMPT, first[:2], torch.tensor([7])])
    fed: list[int] = []  # tokens fed to the draft model, per forward pass
    hidden_states = draft_model.chain.hidden_states

    def counted(ids: torch.Tensor, caches) -> torch.Tensor:
        fed.append(ids.shape[1])
        return hidden_states(ids, caches)

    monkeypatch.setattr(draft_model.chain, "hidden_states", counted)
    again = drafter.propose(context, 3)
    # the two kept drafts were in the cache already: the correction, then one token per draft
    assert fed == [1, 1, 1]
    monkeypatch.undo()
    assert again.tolist() == draft_model.drafter().propose(context, 3).tolist()
    # a context that shrank past the cached one (a failover's rewind) still drafts correctly
    shorter = PROMPT[:5]
    assert (
        drafter.propose(shorter, 3).tolist() == draft_model.drafter().propose(shorter, 3).tolist()
    )


def test_a_draft_model_with_another_vocabulary_size_is_refused(embedded_source, llama):
    with pytest.raises(ModelSourceError, match=r"has 128 tokens.*must share the model's tokenizer"):
        DraftModel.load(str(llama.path), embedded_source)


def test_a_draft_model_with_another_tokenizer_is_refused(embedded_source, tmp_path: Path):
    draft_dir = tmp_path / "draft"
    shutil.copytree(embedded_source.path, draft_dir)
    tokenizer = embedded_source.load_tokenizer()
    tokenizer.add_tokens(["<a-token-only-the-draft-knows>"])
    tokenizer.save_pretrained(draft_dir)
    draft = resolve_model(draft_dir, cache_dir=tmp_path / "cache")
    assert draft.config.vocab_size == embedded_source.config.vocab_size  # the sizes agree
    with pytest.raises(ModelSourceError, match=r"another tokenizer.*1 token ids differ"):
        DraftModel.load(str(draft_dir), embedded_source)


@pytest.mark.parametrize(
    ("speculative", "draft", "expected"),
    [(None, None, "lookup"), (None, "org/small", "draft"), ("off", "org/small", "off")],
)
def test_the_cli_drafts_with_a_draft_model_unless_told_otherwise(speculative, draft, expected):
    args = _args(speculative, draft)
    assert speculative_mode(args) == expected


def test_the_cli_refuses_draft_mode_without_a_draft_model():
    with pytest.raises(UsageError, match=r"--speculative: .*needs a draft model"):
        speculative_mode(_args("draft", None))


def _args(speculative: str | None, draft_model: str | None) -> Namespace:
    return Namespace(speculative=speculative, draft_model=draft_model, default_speculative="lookup")
