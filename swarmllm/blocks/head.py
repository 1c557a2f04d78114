"""The client's share of a model: token embeddings, the final norm and the LM head."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmllm.blocks.families import family_of, weight_names
from swarmllm.blocks.weights import read_tensors


class ModelHead(nn.Module):
    """Embeds tokens before the first hop and turns the last hop's output into logits.

    It computes on its own device: inputs move there and results come back to the CPU (the
    embeddings go onto the wire, the logits to the CPU-side sampler), once per call.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        embeddings: nn.Embedding,
        norm: nn.Module,
        lm_head: nn.Linear,
    ):
        super().__init__()
        self.config = config
        self.embed_tokens, self.norm, self.lm_head = embeddings, norm, lm_head

    @classmethod
    def from_weights(
        cls,
        config: PretrainedConfig,
        weight_files: Mapping[str, Path],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ModelHead:
        family = family_of(config)  # fail on unsupported models before reading any weights
        stored = weight_names(weight_files)
        tied = getattr(config, "tie_word_embeddings", False) or stored.lm_head not in weight_files
        names = [stored.embeddings, stored.final_norm] + ([] if tied else [stored.lm_head])
        tensors = read_tensors(weight_files, names, dtype)
        embeddings = nn.Embedding.from_pretrained(tensors[stored.embeddings], freeze=True)
        norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.data = tensors[stored.final_norm]
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        lm_head.weight = (
            embeddings.weight
            if tied
            else nn.Parameter(tensors[stored.lm_head], requires_grad=False)
        )
        return cls(config, embeddings, norm, lm_head).eval().to(device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids.to(self.device)).cpu()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.to(self.device))).cpu()
