"""The per-family table: which transformers classes implement a decoder-only family's blocks.

Every supported family stores its blocks as ``model.layers.{i}.*``, its embeddings as
``model.embed_tokens``, its final norm as ``model.norm`` and its head as ``lm_head``; only the
classes differ, so one generic code path (span.py, head.py) drives them all. Vision-language
checkpoints (LLaVA) wrap such a language model under another prefix (``weight_names``).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """A family's classes, imported on first use: a peer imports only its model's modeling
    module, not every family's."""

    module: str  # the transformers modeling module
    prefix: str  # its classes' common prefix: ``{prefix}DecoderLayer``, ...

    @property
    def decoder_layer(self) -> type[nn.Module]:
        return self._class("DecoderLayer")

    @property
    def rotary_embedding(self) -> type[nn.Module]:
        return self._class("RotaryEmbedding")

    @property
    def norm(self) -> type[nn.Module]:
        return self._class("RMSNorm")

    def _class(self, suffix: str) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), f"{self.prefix}{suffix}")


FAMILIES: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": Family("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}

# Vision-language wrappers whose language model is one of FAMILIES (its ``text_config``).
MULTIMODAL_TYPES = ("llava",)


@dataclass(frozen=True)
class WeightNames:
    """Where a checkpoint keeps the language model's tensors."""

    layer_prefix: str  # with ``{}`` for the block index
    embeddings: str
    final_norm: str
    lm_head: str


TEXT_WEIGHTS = WeightNames(
    "model.layers.{}.", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
)
# LLaVA as transformers 5 writes it (and 4.x did), then as some newer checkpoints name it.
_WRAPPED_WEIGHTS = (
    WeightNames(
        "language_model.model.layers.{}.",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ),
    WeightNames(
        "model.language_model.layers.{}.",
        "model.language_model.embed_tokens.weight",
        "model.language_model.norm.weight",
        "lm_head.weight",
    ),
)


def weight_names(weight_files: Collection[str]) -> WeightNames:
    """The naming of the language model's tensors in a checkpoint, told by its embeddings."""
    for names in _WRAPPED_WEIGHTS:
        if names.embeddings in weight_files:
            return names
    return TEXT_WEIGHTS


def family_of(config: PretrainedConfig) -> Family:
    """The family of a text config; raises ValueError naming unsupported architectures."""
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"unsupported model architecture {config.model_type!r}; supported families: {supported}"
        ) from None


def meta_layer(config: PretrainedConfig) -> nn.Module:
    """One decoder layer of ``config``'s family on the ``meta`` device: its shapes, no memory."""
    with torch.device("meta"):
        return family_of(config).decoder_layer(config, layer_idx=0)


def sliding_window_of(config: PretrainedConfig, layer_index: int) -> int | None:
    """The attention window of one layer, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: the window applies to every layer
        return int(window)
    return int(window) if layer_types[layer_index] == "sliding_attention" else None
