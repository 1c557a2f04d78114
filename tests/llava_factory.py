"""Tiny random LLaVA checkpoints (CLIP vision tower, Llama or Qwen2 language model), built from
config classes: no download."""

from __future__ import annotations

from pathlib import Path

import torch
from model_factory import COMMON
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

IMAGE_TOKEN = 127
TEXT = {**COMMON, "num_hidden_layers": 4}
TEXT_CONFIGS = {"llama": LlamaConfig(**TEXT), "qwen2": Qwen2Config(**TEXT)}
VISION = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,  # 4 patches: 4 image tokens per picture (the CLS token is dropped)
)


def save_tiny_llava(family: str, directory: Path) -> Path:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=VISION, text_config=TEXT_CONFIGS[family], image_token_id=IMAGE_TOKEN
    )
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory
