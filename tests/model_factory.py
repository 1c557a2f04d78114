"""Tiny random models of every supported family, built from config classes (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**COMMON),
    # a window shorter than the test sequences, so the sliding-window mask is exercised
    "mistral": MistralConfig(**COMMON, sliding_window=12),
    "qwen2": Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=12, max_window_layers=3),
    "qwen3": Qwen3Config(**COMMON, head_dim=16),
}


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Write a random model of ``family`` as a Hugging Face directory and return it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family])
    model.save_pretrained(directory)
    return directory
