"""Quantized and lower-precision peers in real swarms: accuracy, memory, routing, sizing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psutil
import pytest
import torch
from cli_runner import run_cli
from transformers import AutoModelForCausalLM

from swarmllm.blocks.placement import Placement, resolve_placement
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.routing import NoRouteError
from swarmllm.client.verification import TOLERANCES, relative_error
from swarmllm.peer.sizing import block_budget
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "Name three prime numbers and say why they are prime.",
    "Give me a recipe for pancakes.",
]
NEW_TOKENS = 64
# Bounds for int8 (weight-only, CPU) peers against float32 transformers, from the measurement
# in the README, with some margin: once greedy text takes another word, the positions after it
# rarely line up again, so the teacher-forced top-1 agreement is the steadier measure.
INT8_MIN_GREEDY_AGREEMENT = 0.25  # fraction of the 5 x 64 greedy tokens equal to float32's
INT8_MAX_LOGIT_ERROR = 3.0  # max |logit - float32 logit| over the prompts + float32 answers
INT8_MIN_TOP1_AGREEMENT = 0.95  # teacher-forced positions whose argmax equals float32's
BF16_MAX_LOGIT_ERROR = 2.0


def _client(swarm: LocalSwarm, source: ModelSource, **kwargs) -> DistributedModelForCausalLM:
    head = DistributedModelForCausalLM.from_pretrained
    return head(str(source.path), initial_peers=swarm.initial_peers, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def int8_swarm(embedded_source: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    """Three int8 peers covering the embedded model, and a float32 peer beside the first."""
    with LocalSwarm(
        3,
        source=embedded_source,
        workdir=tmp_path_factory.mktemp("swarm"),
        peer_args=["--quant", "int8"],
    ) as running:
        running.start_peer("float32-0", blocks=(0, 10), extra_args=["--quant", "none"])
        running.wait_until_ready(timeout=400)
        yield running


def test_an_int8_peer_takes_far_less_memory_than_a_float32_peer(int8_swarm, embedded_source):
    by_name = {peer.name: peer for peer in int8_swarm.peers}
    rest = [peer.peer_id for peer in int8_swarm.peers if peer.name not in ("peer0-0", "float32-0")]
    ids = prompt_ids(embedded_source.load_tokenizer(), PROMPTS[0])
    for first in ("peer0-0", "float32-0"):
        # an idle float32 peer's weights are pages of the mapped file that nothing has read yet:
        # compare the two once each has served, as a volunteer's peer has
        with _client(
            int8_swarm, embedded_source, allowed_peers=[by_name[first].peer_id, *rest]
        ) as model:
            model.generate(ids, max_new_tokens=2, do_sample=False)
    config = embedded_source.config
    int8_rss = psutil.Process(by_name["peer0-0"].pid).memory_info().rss
    float_rss = psutil.Process(by_name["float32-0"].pid).memory_info().rss
    float_block = block_budget(config, Placement(torch.device("cpu"), torch.float32), 1, 1)
    int8_block = block_budget(config, resolve_placement("cpu", "auto", "int8"), 1, 1)
    span_float_bytes, span_int8_bytes = 10 * float_block.weight_bytes, 10 * int8_block.weight_bytes
    saved = float_rss - int8_rss
    print(
        f"blocks 0-9: float32 peer {float_rss / 2**20:.0f} MiB, int8 peer {int8_rss / 2**20:.0f} "
        f"MiB, saved {saved / 2**20:.0f} MiB = {saved / span_float_bytes:.0%} of the span's "
        f"float32 weights ({span_float_bytes / 2**20:.0f} MiB); fixed cost "
        f"{(float_rss - span_float_bytes) / 2**20:.0f} MiB (float32), "
        f"{(int8_rss - span_int8_bytes) / 2**20:.0f} MiB (int8)"
    )
    assert saved >= 0.6 * span_float_bytes


# 5 x 64 greedy tokens twice: about 2 minutes on a quiet 2-core machine, 20+ under heavy load
@pytest.mark.timeout(1800)
def test_int8_peers_generate_like_float32_within_the_measured_bounds(int8_swarm, embedded_source):
    source = embedded_source
    tokenizer = source.load_tokenizer()
    reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # 64 tokens each, like eos_token_id=[] here
    int8_peers = [peer.peer_id for peer in int8_swarm.peers if peer.name != "float32-0"]
    same = total = top1 = positions = 0
    max_error = 0.0
    prefixes = []  # per prompt: greedy tokens before the first that differs from float32's
    with _client(int8_swarm, source, allowed_peers=int8_peers) as model:
        for prompt in PROMPTS:
            ids = prompt_ids(tokenizer, prompt)
            with torch.inference_mode():
                expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
                expected_logits = reference(expected).logits
            got = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
            new, expected_new = got[0, ids.shape[1] :], expected[0, ids.shape[1] :]
            same += int((new == expected_new).sum())
            total += NEW_TOKENS
            differs = (new != expected_new).nonzero()
            prefixes.append(int(differs[0]) if len(differs) else NEW_TOKENS)
            logits = model.forward(expected)  # teacher-forced on float32's answer
            max_error = max(max_error, float((logits - expected_logits).abs().max()))
            top1 += int((logits.argmax(-1) == expected_logits.argmax(-1)).sum())
            positions += expected.shape[1]
        route = model.inference_session(8).route
    print(
        f"int8 swarm vs float32: greedy {same}/{total} tokens equal (identical prefixes "
        f"{prefixes}), top-1 {top1}/{positions}, max logit error {max_error:.3f}"
    )
    assert {hop.peer_id for hop in route} <= set(int8_peers)
    assert same / total >= INT8_MIN_GREEDY_AGREEMENT
    assert top1 / positions >= INT8_MIN_TOP1_AGREEMENT
    assert 0 < max_error <= INT8_MAX_LOGIT_ERROR


@pytest.fixture(scope="module")
def mixed_swarm(llama: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    """Two float32 peers covering the tiny model and one bfloat16 peer serving all of it."""
    with LocalSwarm(2, source=llama, workdir=tmp_path_factory.mktemp("swarm")) as running:
        running.start_peer("bf16", blocks=(0, 6), extra_args=["--dtype", "bfloat16"])
        running.wait_until_ready(timeout=300)
        yield running


def test_a_float32_session_avoids_a_bfloat16_peer_and_a_bfloat16_one_may_use_it(mixed_swarm, llama):
    bf16 = next(peer.peer_id for peer in mixed_swarm.peers if peer.name == "bf16")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(ids).logits
    with _client(mixed_swarm, llama, min_precision="float32") as model:
        for _ in range(5):  # the bf16 peer is one hop instead of two: it would win on cost
            with model.inference_session(16) as session:
                assert bf16 not in {hop.peer_id for hop in session.route}
        logits = model.forward(ids)
        assert (logits - expected).abs().max() < 1e-4
    no_route = pytest.raises(NoRouteError, match=r"computing in bfloat16 \(below float32\)")
    strict = _client(mixed_swarm, llama, min_precision="float32", allowed_peers=[bf16])
    with strict as model, no_route:
        model.forward(ids)
    with _client(mixed_swarm, llama, min_precision="bfloat16", allowed_peers=[bf16]) as model:
        with model.inference_session(16) as session:
            assert [hop.peer_id for hop in session.route] == [bf16]
        logits = model.forward(ids)
    error = (logits - expected).abs().max().item()
    assert 0 < error <= BF16_MAX_LOGIT_ERROR
    assert relative_error(logits, expected) < TOLERANCES["bfloat16"]


def test_status_shows_each_peers_device_and_precision(mixed_swarm, llama):
    result = run_cli(
        "status",
        "--model",
        str(llama.path),
        "--initial-peers",
        *mixed_swarm.initial_peers,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["peers"]}
    assert (rows["bf16"]["device"], rows["bf16"]["dtype"], rows["bf16"]["quant"]) == (
        "cpu",
        "bfloat16",
        "none",
    )
    assert rows["peer0-0"]["dtype"] == "float32"


def test_a_peer_sized_by_max_memory_takes_the_blocks_that_fit(mixed_swarm, llama):
    budget = block_budget(llama.config, Placement(torch.device("cpu"), torch.float32), 512, None)
    k = 4
    max_memory = k * (budget.weight_bytes + budget.cache_bytes) + budget.weight_bytes // 2
    peer = mixed_swarm.start_peer(
        "sized", extra_args=["--max-memory", str(max_memory), "--cache-tokens", "512"]
    )
    coverage = mixed_swarm.wait_until_ready(timeout=300)
    record = coverage.peers()[peer.peer_id]
    assert record.end - record.start == k
    assert f"= {k} blocks; taking {k} of 6" in peer.log_path.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--device", "cuda"], "error: --device cuda: CUDA is not available here"),
        (["--device", "cpu", "--quant", "nf4"], "error: --quant nf4 runs only on CUDA"),
    ],
)
def test_a_peer_refuses_what_the_machine_cannot_do_in_one_line(flags, line):
    result = run_cli("peer", *flags)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(line)
    assert len(result.stderr.strip().splitlines()) == 1
