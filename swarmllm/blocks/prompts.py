"""Token ids of a text prompt: one user message in the model's chat template, or plain text."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool = True) -> torch.Tensor:
    """Token ids [1, n] of ``text``: as a user message ready for the reply with ``chat``."""
    if not chat:
        return tokenizer(text, return_tensors="pt")["input_ids"]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
