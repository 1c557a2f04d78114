"""Image prompts through a model run wholly in this process: the reference for the swarm.

The same pieces the swarm uses (the client's encoder and head, the peer's adapter and spans),
chained locally, so the benchmark and the tests can compare a swarm's answers and logits with
a local run of the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from swarmllm.blocks.local_chain import LocalChain
from swarmllm.blocks.vision import (
    ImageEncoder,
    ImageLike,
    VisionAdapter,
)
from swarmllm.blocks.vision_factory import load_adapter, load_image_encoder

if TYPE_CHECKING:
    from swarmllm.blocks.sources import ModelSource


class LocalVisionChain:
    def __init__(self, chain: LocalChain, encoder: ImageEncoder, adapter: VisionAdapter):
        self.chain, self.encoder, self.adapter = chain, encoder, adapter

    @classmethod
    def load(cls, source: ModelSource, num_spans: int = 3) -> LocalVisionChain:
        encoder, adapter = load_image_encoder(source), load_adapter(source)
        if encoder is None or adapter is None:
            raise ValueError(f"model {source.name} has no vision adapter")
        return cls(LocalChain.load(source, num_spans=num_spans), encoder, adapter)

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, images: Sequence[ImageLike], caches=None
    ) -> torch.Tensor:
        """Logits [1, tokens, vocab] of a prompt whose placeholders hold ``images``."""
        inputs = self.encoder.image_inputs(input_ids, images)
        hidden = self.adapter(self.chain.head.embed(input_ids), inputs, 0)
        return self.chain.head.logits(self.chain.run_spans(hidden, caches))

    @torch.inference_mode()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        images: Sequence[ImageLike],
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
    ) -> list[int]:
        """Greedy continuation of one image prompt (ending with an EOS token if produced)."""
        caches = self.chain.new_caches()
        logits = self.prefill(input_ids, images, caches)[:, -1]
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            token = int(logits.argmax(-1))
            tokens.append(token)
            if token in eos_token_ids:
                break
            logits = self.chain.logits(input_ids.new_tensor([[token]]), caches)[:, -1]
        return tokens
