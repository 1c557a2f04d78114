"""The embedded SmolLM2 model run as 3 chained spans, against transformers on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from swarmllm.blocks.local_chain import LocalChain
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.span import BlockSpan

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
NEW_TOKENS = 32


def test_three_spans_answer_like_transformers(embedded_source):
    tokenizer = embedded_source.load_tokenizer()
    prompt = prompt_ids(tokenizer, QUESTION)
    reference = AutoModelForCausalLM.from_pretrained(embedded_source.path, dtype=torch.float32)
    eos = reference.generation_config.eos_token_id
    with torch.inference_mode():
        expected = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
        )[0, prompt.shape[1] :].tolist()
    del reference

    chain = LocalChain.load(embedded_source, num_spans=3)
    assert [(s.start, s.end) for s in chain.spans] == [(0, 10), (10, 20), (20, 30)]
    tokens, _ = chain.generate_greedy(prompt, NEW_TOKENS, eos_token_id=eos)
    assert tokens == expected
    assert "Paris" in tokenizer.decode(tokens, skip_special_tokens=True)


def test_span_of_ten_blocks_holds_a_third_of_the_layers_and_no_embeddings(embedded_source):
    config, files = embedded_source.config, embedded_source.weight_files()
    assert config.num_hidden_layers == 30
    layer_numel = 0
    for name, file in files.items():
        if name.startswith("model.layers."):
            with safe_open(file, framework="pt") as handle:
                layer_numel += math.prod(handle.get_slice(name).get_shape())

    span = BlockSpan.from_weights(config, files, 10, 20)
    parameters = dict(span.named_parameters())
    assert 3 * sum(p.numel() for p in parameters.values()) == layer_numel
    prefixes = tuple(f"layers.{i}." for i in range(10))
    assert all(name.startswith(prefixes) for name in parameters)
    assert not any(config.vocab_size in p.shape for p in parameters.values())
    assert [layer.self_attn.layer_idx for layer in span.layers] == list(range(10, 20))
