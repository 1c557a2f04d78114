"""Tiny random LLaVA models through real local swarms: equivalence with transformers, routing
to the adapter, failover with an image prompt, and bad image input refused by the peer."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch
from llava_factory import IMAGE_TOKEN, save_tiny_llava
from streamers import AfterTokens
from transformers import LlavaForConditionalGeneration

from swarmllm.blocks.sources import ModelSource, resolve_model
from swarmllm.blocks.vision import ADAPTER_BLOCK, ImageError, ImageInputs
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.routing import Hop, NoRouteError
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Callable[[str], ModelSource]:
    hashes = tmp_path_factory.mktemp("hashes")
    made: dict[str, ModelSource] = {}

    def make(family: str) -> ModelSource:
        if family not in made:
            directory = save_tiny_llava(family, tmp_path_factory.mktemp(f"llava-{family}"))
            made[family] = resolve_model(directory, cache_dir=hashes)
        return made[family]

    return make


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with one picture's 4 placeholders in the middle, and its pixel values."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, IMAGE_TOKEN, (9,), generator=generator).tolist()
    ids = torch.tensor([text[:4] + [IMAGE_TOKEN] * 4 + text[4:]])
    return ids, torch.randn(1, 3, 28, 28, generator=generator)


def _reference(source: ModelSource, ids: torch.Tensor, pixels: torch.Tensor):
    """transformers' logits for the prompt, and its greedy continuation (full recompute)."""
    model = LlavaForConditionalGeneration.from_pretrained(source.path).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        sequence = ids
        for _ in range(NEW_TOKENS):
            last = model(input_ids=sequence, pixel_values=pixels).logits[:, -1]
            sequence = torch.cat([sequence, last.argmax(-1, keepdim=True)], dim=1)
    return logits, sequence


def _client(source: ModelSource, swarm: LocalSwarm, **kwargs) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        str(source.path), initial_peers=swarm.initial_peers, **kwargs
    )


@pytest.fixture(scope="module")
def llama_swarm(llava, tmp_path_factory) -> Iterator[LocalSwarm]:
    """Blocks 0-1 twice (both with the adapter) and 2-3 twice, plus a block-0 peer without it."""
    source = llava("llama")
    with LocalSwarm(
        4,
        source=source,
        replicas=2,
        workdir=tmp_path_factory.mktemp("swarm"),
        peer_args=["--refresh-period", "2"],
    ) as swarm:
        swarm.start_peer("plain", blocks=(0, 2), extra_args=["--no-adapter"])
        swarm.wait_until_ready(timeout=180)
        yield swarm


def test_llama_llava_through_the_swarm_equals_transformers(llava, llama_swarm):
    source = llava("llama")
    ids, pixels = _prompt()
    expected_logits, expected_tokens = _reference(source, ids, pixels)
    with _client(source, llama_swarm) as model:
        logits = model.forward(ids, images=[pixels[0]])
        tokens = model.generate(ids, images=[pixels[0]], max_new_tokens=NEW_TOKENS, eos_token_id=[])
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens.tolist() == expected_tokens.tolist()


def test_qwen2_llava_through_the_swarm_equals_transformers(llava, tmp_path):
    source = llava("qwen2")
    ids, pixels = _prompt()
    expected_logits, expected_tokens = _reference(source, ids, pixels)
    with LocalSwarm(2, source=source, workdir=tmp_path) as swarm:
        swarm.wait_until_ready(timeout=180)
        with _client(source, swarm) as model:
            logits = model.forward(ids, images=[pixels[0]])
            tokens = model.generate(
                ids, images=[pixels[0]], max_new_tokens=NEW_TOKENS, eos_token_id=[]
            )
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens.tolist() == expected_tokens.tolist()


def test_image_sessions_route_to_a_block_0_peer_with_the_adapter(llava, llama_swarm):
    source = llava("llama")
    plain = llama_swarm.peer(next(p.peer_id for p in llama_swarm.peers if p.name == "plain"))
    with _client(source, llama_swarm) as model:
        coverage = model.connection.coverage(source.model_id, 4, extra=[ADAPTER_BLOCK])
        announced = set(coverage.extra[ADAPTER_BLOCK])
        assert plain.peer_id not in announced and len(announced) == 2
        for _ in range(4):
            with model.inference_session(max_length=32, images=True) as session:
                assert session.route[0].peer_id in announced


def test_failover_of_the_adapter_peer_replays_the_image(llava, tmp_path):
    source = llava("llama")
    ids, pixels = _prompt()
    _, expected = _reference(source, ids, pixels)
    with LocalSwarm(4, source=source, replicas=2, workdir=tmp_path) as swarm:
        swarm.wait_until_ready(timeout=180)
        with _client(source, swarm, step_timeout=3.0) as model:
            length = ids.shape[1] + NEW_TOKENS
            with model.inference_session(max_length=length, images=True) as session:
                victim = swarm.peer(session.route[0].peer_id)
                streamer = AfterTokens(4, lambda: victim.send_signal(signal.SIGKILL))
                tokens = model.generate(
                    ids,
                    session=session,
                    streamer=streamer,
                    images=[pixels[0]],
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=[],
                )
                assert session.route[0].peer_id != victim.peer_id
            assert victim.peer_id in model.bans.banned()
    assert tokens.tolist() == expected.tolist()


def _bad_inputs(features: torch.Tensor) -> list[tuple[str, ImageInputs, str]]:
    positions = torch.tensor([[4, 5, 6, 7]])
    return [
        ("wrong feature size", ImageInputs(features[..., :16], positions), "feature size 16"),
        ("NaN", ImageInputs(torch.full_like(features, float("nan")), positions), "NaN"),
        ("placeholder count", ImageInputs(features, positions[:, :3]), "one per feature vector"),
        ("outside the message", ImageInputs(features, positions + 20), "lie in this message"),
    ]


def test_bad_image_input_is_refused_and_the_peer_keeps_serving(llava, llama_swarm):
    source = llava("llama")
    ids, pixels = _prompt()
    with _client(source, llama_swarm) as model:
        hidden = model.head.embed(ids)
        good = ImageInputs(model.image_encoder.encode([pixels[0]]), torch.tensor([[4, 5, 6, 7]]))
        coverage = model.connection.coverage(source.model_id, 4, extra=[ADAPTER_BLOCK])
        adapter_peer = sorted(coverage.extra[ADAPTER_BLOCK])[0]
        plain = next(p for p in llama_swarm.peers if p.name == "plain")
        later = next(p for p in llama_swarm.peers if p.blocks == (2, 4))

        async def attempt(hop: Hop, images: ImageInputs, retry: ImageInputs | None) -> str:
            """Send ``images`` (refused), then a valid step with ``retry`` on the same session."""
            spec = SessionSpec(source.model_id, uuid.uuid4().hex, max_length=64)
            stream = HopStream(model.connection, hop, spec)
            await stream.open()
            try:
                with pytest.raises(HopFailure) as refused:
                    await stream.step(hidden, 0, images)
                output = await stream.step(hidden, 0, retry)
                assert output.shape == hidden.shape and torch.isfinite(output).all()
                return refused.value.reason
            finally:
                await stream.close()

        for name, bad, complaint in _bad_inputs(good.features):
            hop = Hop(adapter_peer, 0, 2)
            reason = model.connection.run(attempt(hop, bad, good), timeout=60)
            assert complaint in reason, name
        reason = model.connection.run(attempt(Hop(plain.peer_id, 0, 2), good, None), timeout=60)
        assert "serves no 'vision' adapter" in reason
        reason = model.connection.run(attempt(Hop(later.peer_id, 2, 4), good, None), timeout=60)
        assert "serves no 'vision' adapter" in reason


def test_images_for_a_text_only_model_or_a_swarm_without_the_adapter_are_clear_errors(
    llava, tiny_source, tmp_path
):
    ids, pixels = _prompt()
    text_only = tiny_source("llama")
    with LocalSwarm(1, source=text_only, workdir=tmp_path / "text") as swarm:
        swarm.wait_until_ready(timeout=180)
        with _client(text_only, swarm) as model, pytest.raises(ImageError, match="no vision"):
            model.generate(ids, images=[pixels[0]], max_new_tokens=2)
    source = llava("llama")
    with LocalSwarm(
        1, source=source, workdir=tmp_path / "plain", peer_args=["--no-adapter"]
    ) as swarm:
        swarm.wait_until_ready(timeout=180)
        with _client(source, swarm) as model, pytest.raises(NoRouteError, match="adapter"):
            model.generate(ids, images=[pixels[0]], max_new_tokens=2)
