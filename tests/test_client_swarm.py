"""The client against a real 3-peer swarm of the embedded model, compared with transformers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from cli_runner import run_cli
from transformers import AutoModelForCausalLM

from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import ModelSource
from swarmllm.client.connection import SwarmConnectionClosedError
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

STORY = "Write a short story about a lighthouse keeper and a seagull."
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def swarm(embedded_source: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(3, source=embedded_source, workdir=tmp_path_factory.mktemp("swarm")) as running:
        running.wait_until_ready(timeout=180)
        yield running


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers) as m:
        yield m


@pytest.fixture(scope="module")
def reference(embedded_source: ModelSource):
    return AutoModelForCausalLM.from_pretrained(embedded_source.path, dtype=torch.float32).eval()


def chat_ids(model: DistributedModelForCausalLM, text: str) -> torch.Tensor:
    return prompt_ids(model.tokenizer, text)


def test_greedy_generate_equals_transformers_token_for_token(model, reference):
    input_ids = chat_ids(model, STORY)
    ours = model.generate(input_ids, max_new_tokens=NEW_TOKENS)
    theirs = reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.shape[1] - input_ids.shape[1] >= 32
    assert ours.tolist() == theirs.tolist()


def test_prefill_logits_match_transformers(model, reference):
    input_ids = chat_ids(model, "What is the capital of France?")
    with torch.no_grad():
        expected = reference(input_ids).logits
    torch.testing.assert_close(model.forward(input_ids), expected, atol=1e-4, rtol=0)


def test_cli_generate_prints_the_reference_answer(swarm, model, reference):
    input_ids = chat_ids(model, STORY)
    theirs = reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = model.tokenizer.decode(theirs[0, input_ids.shape[1] :], skip_special_tokens=True)
    result = run_cli(
        "generate",
        "--initial-peers",
        *swarm.initial_peers,
        "--chat",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--show-route",
        STORY,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()
    assert "blocks 0-9" in result.stderr  # --show-route names each hop


def test_batch_of_two_prompts_equals_each_prompt_alone(model):
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=12, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = model.generate(
            tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=12, eos_token_id=[]
        )
        assert together[row, -12:].tolist() == alone[0, -12:].tolist()


def test_seeded_sampling_is_reproducible(model):
    input_ids = chat_ids(model, "Name a colour.")
    settings = dict(
        max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1
    )
    first = model.generate(input_ids, seed=7, **settings)
    second = model.generate(input_ids, seed=7, **settings)
    others = [model.generate(input_ids, seed=seed, **settings) for seed in (8, 9, 10)]
    assert first.tolist() == second.tolist()
    assert any(other.tolist() != first.tolist() for other in others)


def test_a_session_continues_a_chat_without_resending_the_past(model, reference):
    tokenizer = model.tokenizer
    turn_one = [{"role": "user", "content": "What is the capital of France?"}]
    first_ids = tokenizer.apply_chat_template(
        turn_one, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with model.inference_session(max_length=256) as session:
        first = model.generate(first_ids, session=session, max_new_tokens=20)
        answer = tokenizer.decode(first[0, first_ids.shape[1] :], skip_special_tokens=True)
        conversation = [
            *turn_one,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And of Italy?"},
        ]
        full_ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        seen = session.token_ids.shape[1]
        assert full_ids[0, :seen].tolist() == session.token_ids[0].tolist()
        second = model.generate(full_ids[:, seen:], session=session, max_new_tokens=20)
    expected = reference.generate(full_ids, max_new_tokens=20, do_sample=False)
    assert second[0].tolist() == expected[0, seen:].tolist()


def test_cli_errors_are_one_clear_line(swarm, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return run_cli("generate", *args)

    started = time.monotonic()
    unreachable = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD7ayW8p8Y1L9vxvLWK3mzY3KFNSt7qzQhdH6YAAKbR5C"
    result = run("--initial-peers", unreachable, "hello")
    assert result.returncode != 0
    assert "could not join the swarm" in result.stderr
    assert time.monotonic() - started < 90

    result = run("--initial-peers", "/ip4/nonsense", "hello")
    assert result.returncode != 0 and "invalid multiaddr" in result.stderr

    sys.path.insert(0, "tests")
    from model_factory import save_tiny_model

    other = save_tiny_model("llama", tmp_path / "other")
    result = run("--model", str(other), "--initial-peers", *swarm.initial_peers, "hello")
    assert result.returncode != 0
    assert "no peer in the swarm serves model" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_stop_strings_end_generation_where_they_appear(model):
    input_ids = chat_ids(model, "What is the capital of France?")
    output = model.generate(input_ids, max_new_tokens=30, stop_strings=["Paris"])
    text = model.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert text.endswith("Paris"), text


def test_a_shut_down_model_refuses_work_instead_of_waiting_forever(swarm) -> None:
    """A model owns its connection and closes it when shut down or collected; work sent on it
    afterwards (for instance by a second model given the same connection) used to wait forever
    for a loop that no longer runs (bench_swarm hung so)."""
    model = DistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers)
    model.shutdown()
    started = time.monotonic()
    with pytest.raises(SwarmConnectionClosedError, match="connection is closed"):
        model.connection.run(asyncio.sleep(0), timeout=20)  # the timeout: the old code hangs
    with pytest.raises(SwarmConnectionClosedError):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    assert time.monotonic() - started < 5
