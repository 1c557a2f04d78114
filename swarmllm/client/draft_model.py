"""Drafts from a small local model (``speculative="draft"``, ``--draft-model REF``).

The draft model runs whole on the client, with this project's own spans (any family a peer can
serve), and proposes its greedy continuation of the context. A deterministic draft keeps the
output exact: greedy verification keeps only tokens the swarm's model picks itself, and with
sampling ``accept_or_resample`` (a proposal that is one token, not a distribution) leaves the
tokens distributed as without drafts. Sampling the drafts from the draft model's distribution
would be accepted more often; a greedy draft needs no probabilities to travel with it.

The model's weights are shared by every sequence; each sequence drafts with its own
``ModelDrafter``, whose cache keeps the context it last saw, so a round feeds only what changed
since: the swarm's corrections and the new token.
"""

from __future__ import annotations

import torch

from swarmllm.blocks.local_chain import LocalChain
from swarmllm.blocks.sources import ModelSource, ModelSourceError, resolve_model


class DraftModel:
    """A whole small model on the client, drafting for a swarm model with the same tokens."""

    def __init__(self, chain: LocalChain, name: str, vocab_size: int):
        self.chain, self.name = chain, name
        self.vocab_size = vocab_size  # ids a draft may hold: those both models know

    @classmethod
    def load(cls, ref: str, target: ModelSource, dtype: torch.dtype = torch.float32) -> DraftModel:
        """Resolve ``ref`` like any model (hub id, folder, "embedded") and check that it
        speaks ``target``'s tokens before reading its weights."""
        source = resolve_model(ref)
        check_same_tokens(source, target)
        chain = LocalChain.load(source, num_spans=1, dtype=dtype)
        vocab = min(source.config.vocab_size, target.config.vocab_size)
        return cls(chain, source.name, vocab)

    def drafter(self) -> ModelDrafter:
        """A drafter for one sequence (its own cache)."""
        return ModelDrafter(self)


class ModelDrafter:
    """One sequence's drafts from a ``DraftModel``; ``propose`` as ``PromptLookup``'s."""

    def __init__(self, model: DraftModel):
        self.model = model
        self._caches = model.chain.new_caches()
        self._cached = torch.zeros(0, dtype=torch.long)  # the tokens the caches hold

    @torch.inference_mode()
    def propose(self, tokens: torch.Tensor, limit: int) -> torch.Tensor:
        """The draft model's greedy continuation (``limit`` tokens, 1-D) of ``tokens`` (1-D)."""
        if limit < 1 or tokens.shape[0] == 0:
            return tokens[:0]
        # reuse the cache up to where the context changed, feeding at least the last token
        kept = min(_common_prefix(self._cached, tokens), tokens.shape[0] - 1)
        for cache in self._caches:
            cache.truncate(kept)
        chain, feed, drafts = self.model.chain, tokens[kept:], []
        for _ in range(limit):
            # the LM head only at the last position: a long first feed needs no other logits
            last = chain.hidden_states(feed[None], self._caches)[:, -1]
            token = chain.head.logits(last)[0, : self.model.vocab_size].argmax()
            drafts.append(token)
            feed = token[None]
        proposed = torch.stack(drafts)
        self._cached = torch.cat([tokens, proposed[:-1]])  # the last draft was never fed
        return proposed


def check_same_tokens(draft: ModelSource, target: ModelSource) -> None:
    """ModelSourceError unless ``draft`` tokenizes as ``target`` does: the same vocabulary
    when both have a tokenizer, else the same vocabulary size."""
    draft_vocab, target_vocab = _vocabulary(draft), _vocabulary(target)
    if draft_vocab is not None and target_vocab is not None:
        if draft_vocab != target_vocab:
            differ = len(draft_vocab.items() ^ target_vocab.items())
            raise ModelSourceError(
                f"draft model {draft.name} has another tokenizer than {target.name} "
                f"({differ} token ids differ): a draft model must share the model's tokenizer"
            )
        return
    sizes = draft.config.vocab_size, target.config.vocab_size
    if sizes[0] != sizes[1]:
        raise ModelSourceError(
            f"draft model {draft.name} has {sizes[0]} tokens and {target.name} {sizes[1]}: "
            "a draft model must share the model's tokenizer"
        )


def _vocabulary(source: ModelSource) -> dict[str, int] | None:
    try:
        return source.load_tokenizer().get_vocab()
    except ModelSourceError:
        return None  # a bare checkpoint (tests' tiny models): only its size can be compared


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading entries the 1-D ``a`` and ``b`` share."""
    length = min(a.shape[0], b.shape[0])
    differ = (a[:length] != b[:length]).nonzero()
    return int(differ[0]) if differ.numel() else length
