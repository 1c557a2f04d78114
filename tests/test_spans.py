"""Spans of every supported family, chained in one process, against transformers' own model."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_factory import TINY_CONFIGS
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config

from swarmllm.blocks.kv_cache import KVCache
from swarmllm.blocks.local_chain import LocalChain, span_bounds
from swarmllm.blocks.sources import resolve_model
from swarmllm.blocks.span import BlockSpan

NUM_BLOCKS = 6  # every tiny model has 6 blocks
PROMPT_LENGTH = 20  # longer than the tiny models' sliding windows (12 tokens)


def tokens(length: int, seed: int = 1, rows: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (rows, length), generator=generator)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def source(family, tiny_source):
    return tiny_source(family)


@pytest.fixture
def reference(source):
    """transformers' own implementation of the same tiny model."""
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()


@pytest.mark.parametrize("splits", [[], [1], [3], [2, 4], [1, 2, 3, 4, 5]])
def test_chained_spans_reproduce_the_reference_hidden_states(source, reference, splits):
    chain = LocalChain.load(source, splits=splits)
    ids = tokens(PROMPT_LENGTH)
    with torch.inference_mode():
        expected = reference(ids, output_hidden_states=True)

    hidden = chain.head.embed(ids)
    for span in chain.spans:
        hidden = span(hidden)
        if span.end < NUM_BLOCKS:  # hidden_states[k] is the input of block k
            assert_close(hidden, expected.hidden_states[span.end], atol=1e-5)
    # transformers' last hidden state is taken after the final norm
    assert_close(chain.head.norm(hidden), expected.hidden_states[-1], atol=1e-5)
    assert_close(chain.head.logits(hidden), expected.logits, atol=1e-5)


def test_greedy_decoding_matches_reference_generate(source, reference):
    ids = tokens(PROMPT_LENGTH)
    new_tokens = 16
    # random weights may pick EOS; generate() would take it from the model's own config
    reference.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        expected = reference.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    expected_tokens = expected.sequences[0, PROMPT_LENGTH:].tolist()
    assert len(expected_tokens) == new_tokens

    chain = LocalChain.load(source)
    generated, span_seconds = chain.generate_greedy(ids, new_tokens)
    assert generated == expected_tokens
    assert len(span_seconds) == 3 and all(seconds > 0 for seconds in span_seconds)

    caches = chain.new_caches()
    chunk = ids
    for step, token in enumerate(expected_tokens):
        logits = chain.logits(chunk, caches)[:, -1]
        assert_close(logits, expected.logits[step], atol=1e-4)
        chunk = torch.tensor([[token]])
    assert all(cache.length == PROMPT_LENGTH + new_tokens - 1 for cache in caches)


@pytest.mark.parametrize("chunks", [[10, 5, 1], [3, 9, 1, 7]])
def test_chunks_after_a_cache_match_one_full_forward(source, reference, chunks):
    ids = tokens(sum(chunks))
    with torch.inference_mode():
        expected = reference(ids).logits
    chain = LocalChain.load(source)
    caches = chain.new_caches()
    bounds = list(itertools.accumulate(chunks, initial=0))
    pieces = [chain.logits(ids[:, a:b], caches) for a, b in itertools.pairwise(bounds)]
    assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4)


def test_rewound_cache_replays_and_branches(source, reference):
    chain = LocalChain.load(source)
    ids = tokens(PROMPT_LENGTH)
    caches = chain.new_caches()
    first = chain.logits(ids, caches)

    for cache in caches:
        cache.truncate(12)
    assert_close(chain.logits(ids[:, 12:], caches), first[:, 12:], atol=1e-5)

    for cache in caches:
        cache.truncate(8)
    branch = tokens(6, seed=7)
    with torch.inference_mode():
        expected = reference(torch.cat([ids[:, :8], branch], dim=1)).logits[:, 8:]
    assert_close(chain.logits(branch, caches), expected, atol=1e-4)


def test_left_padded_batch_equals_each_prompt_alone(source, reference):
    chain = LocalChain.load(source)
    lengths, pad_token, steps = (PROMPT_LENGTH, 13), 0, 4
    prompts = [tokens(length, seed=seed)[0] for seed, length in enumerate(lengths)]
    pads = [PROMPT_LENGTH - length for length in lengths]
    batch = torch.stack(
        [
            torch.cat([torch.full((pad,), pad_token), p])
            for pad, p in zip(pads, prompts, strict=True)
        ]
    )
    pad_lengths = torch.tensor(pads)
    continuation = tokens(steps, seed=9, rows=2)

    caches = chain.new_caches()
    pieces = [chain.logits(batch, caches, pad_lengths)]
    for step in range(steps):
        pieces.append(chain.logits(continuation[:, step : step + 1], caches, pad_lengths))
    batched = torch.cat(pieces, dim=1)

    full = torch.cat([batch, continuation], dim=1)
    attention_mask = (torch.arange(full.shape[1])[None] >= pad_lengths[:, None]).long()
    with torch.inference_mode():
        expected = reference(
            full,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
    for row, pad in enumerate(pads):
        alone = chain.logits(full[row : row + 1, pad:])
        assert_close(batched[row, pad:], alone[0], atol=1e-4)
        assert_close(batched[row, pad:], expected[row, pad:], atol=1e-4)


@pytest.mark.parametrize(("start", "end"), [(0, 1), (2, 5), (0, NUM_BLOCKS)])
def test_span_holds_exactly_its_layers(source, reference, start, end):
    span = BlockSpan.from_weights(source.config, source.weight_files(), start, end)
    expected = {
        f"layers.{index - start}.{name}": parameter
        for index in range(start, end)
        for name, parameter in reference.model.layers[index].named_parameters()
    }
    actual = dict(span.named_parameters())
    assert actual.keys() == expected.keys()
    for name, parameter in actual.items():
        assert torch.equal(parameter, expected[name]), name
    assert sum(p.numel() for p in actual.values()) == sum(p.numel() for p in expected.values())


def test_unsupported_family_is_refused_by_name(tmp_path):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        BlockSpan.from_weights(config, {}, 0, 1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'gpt2' .* is not supported"):
        resolve_model(tmp_path, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(("start", "end"), [(4, 8), (3, 3), (-1, 2), (5, 4)])
def test_span_outside_the_model_is_refused(tiny_source, start, end):
    source = tiny_source("llama")
    with pytest.raises(ValueError, match=rf"span \[{start}, {end}\) is outside the model's 6"):
        BlockSpan.from_weights(source.config, source.weight_files(), start, end)


@pytest.mark.parametrize("splits", [[4, 2], [0, 3], [3, 6], [3, 3]])
def test_bad_split_points_are_refused(tiny_source, splits):
    with pytest.raises(ValueError, match="must increase strictly between 0 and 6"):
        LocalChain.load(tiny_source("llama"), splits=splits)


def test_spans_are_cut_near_equal_or_refused():
    assert span_bounds(6, num_spans=4) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert span_bounds(30) == [(0, 10), (10, 20), (20, 30)]
    with pytest.raises(ValueError, match="cannot cut 6 blocks into 7 spans"):
        span_bounds(6, num_spans=7)


def test_cache_cannot_rewind_past_its_length():
    cache = KVCache(range(2))
    cache.advance(5)
    with pytest.raises(ValueError, match="cannot rewind a cache of 5 tokens to 6"):
        cache.truncate(6)


def test_a_cache_of_fixed_capacity_allocates_once_and_refuses_to_grow(source):
    span = BlockSpan.from_weights(source.config, source.weight_files(), 0, 2)
    fixed, growing = span.new_cache(capacity=20), span.new_cache()
    width = source.config.hidden_size
    for length in (7, 5, 1, 1, 6):  # multi-token chunks after a cache, as a peer gets them
        x = torch.randn(1, length, width)
        assert_close(span(x, fixed), span(x, growing), atol=1e-5)
        assert {tuple(buffer.shape[-2:-1]) for buffer in fixed._keys} == {(20,)}
    with pytest.raises(ValueError, match="21 tokens exceed the cache's capacity of 20"):
        span(torch.randn(1, 1, width), fixed)
    assert fixed.length == 20  # the refused step left the cache as it was
