"""The embedded model's shipped vision adapter through a 3-peer swarm: it sees, like a local run."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from cli_runner import run_cli

from swarmllm.assets import example_image
from swarmllm.blocks import shapes
from swarmllm.blocks.local_vision import LocalVisionChain
from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.vision import load_image
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

EXAMPLE = example_image("green_star.png")
HELD_OUT_INDEX = 3  # a fixed picture of the held-out split
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def swarm(embedded_source: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(3, source=embedded_source, workdir=tmp_path_factory.mktemp("swarm")) as running:
        running.wait_until_ready(timeout=300)
        yield running


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(
        None, initial_peers=swarm.initial_peers
    ) as client:
        yield client


def test_the_shipped_adapter_belongs_to_the_embedded_model(embedded_source):
    assert shapes.serves(embedded_source)
    assert shapes.ASSET_PATH.stat().st_size < 4 * 1024**2


def test_a_held_out_picture_is_answered_correctly_with_the_local_logits(embedded_source, model):
    scene = shapes.scenes("heldout", HELD_OUT_INDEX + 1)[HELD_OUT_INDEX]
    picture = scene.draw()
    question = shapes.QUESTIONS[2]
    ids = model.image_prompt(question)

    logits = model.forward(ids, images=[picture])
    local = LocalVisionChain.load(embedded_source)
    torch.testing.assert_close(logits, local.prefill(ids, [picture]), atol=1e-4, rtol=0)

    eos = [model.tokenizer.eos_token_id]
    output = model.generate(ids, images=[picture], max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    new = output[0, ids.shape[1] :].tolist()
    assert new == local.generate_greedy(ids, [picture], MAX_NEW_TOKENS, eos)
    reply = model.tokenizer.decode(new, skip_special_tokens=True)
    assert shapes.answer_is_correct(question, reply, scene.shape, scene.colour), reply


def test_the_cli_answers_about_the_shipped_example_picture(swarm, tmp_path):
    assert load_image(EXAMPLE).size == (128, 128)
    result = run_cli(  # by the example's name, from a directory without it
        "generate",
        "--image",
        "green_star.png",
        "--initial-peers",
        *swarm.initial_peers,
        "What is in the picture?",
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert shapes.answer_is_correct("What is in the picture?", result.stdout, "star", "green")


def test_status_shows_which_peer_serves_the_adapter(swarm):
    result = run_cli("status", "--initial-peers", *swarm.initial_peers, "--json")
    assert result.returncode == 0, result.stderr
    adapters = {tuple(row["blocks"]): row["adapters"] for row in json.loads(result.stdout)["peers"]}
    assert {blocks: names for blocks, names in adapters.items() if names} == {
        peer.blocks: [shapes.adapter_name()] for peer in swarm.peers if peer.blocks[0] == 0
    }


def test_a_missing_image_fails_before_joining_the_swarm(tmp_path):
    result = run_cli(
        "generate",
        "--image",
        str(tmp_path / "nope.png"),
        "--initial-peers",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        "What is in the picture?",
    )
    assert result.returncode == 2  # a wrong argument, refused while parsing
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
