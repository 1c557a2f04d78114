"""Speculative decoding through a real swarm: the same greedy tokens as plain decoding and as
transformers, drafts really accepted, rewinds that cross a failover, and the peers' KV caches
after a rewind equal to a fresh prefill of only the kept tokens."""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_factory import save_tiny_model
from streamers import AfterTokens
from transformers import AutoModelForCausalLM

from swarmllm.api import scheduler as scheduler_module
from swarmllm.api.metrics import Metrics
from swarmllm.api.prompts import Prompt
from swarmllm.api.scheduler import Delta, Finished, Job, Scheduler
from swarmllm.blocks.sources import ModelSource
from swarmllm.client.draft_model import DraftModel
from swarmllm.client.generation import GenerationConfig, Speculation
from swarmllm.client.model import ClientSession, DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

NEW_TOKENS = 40
STEP_TIMEOUT = 60.0  # a lost peer must be noticed by its dropped stream, not this timeout


def _random(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


# a copy-heavy prompt: one phrase three times, so that lookup drafts its continuation
COPY = _random(10, 0).repeat(1, 3)
PROMPTS = {"copy": COPY, "random-a": _random(12, 1), "random-b": _random(7, 2)}


@pytest.fixture(scope="module")
def swarm(llama: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(
        4, source=llama, replicas=2, workdir=tmp_path_factory.mktemp("speculative")
    ) as running:
        running.wait_until_ready(timeout=240)
        yield running


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm, llama: ModelSource) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(
        str(llama.path), initial_peers=swarm.initial_peers, step_timeout=STEP_TIMEOUT
    ) as distributed:
        yield distributed


@pytest.fixture(scope="module")
def reference(llama: ModelSource):
    local = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    local.generation_config.eos_token_id = None
    return local


def _generate(model, prompt, speculative: str, **kwargs) -> tuple[list[int], ClientSession]:
    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        output = model.generate(
            prompt,
            session=session,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=[],
            speculative=speculative,
            **kwargs,
        )
    return output[0].tolist(), session


def _history_lengths(session: ClientSession) -> list[int]:
    """Tokens each hop's failover history holds."""
    return [sum(chunk.shape[1] for chunk in chunks) for chunks in session._session.history]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_speculative_greedy_equals_plain_greedy_and_transformers(name, model, reference) -> None:
    prompt = PROMPTS[name]
    plain, plain_session = _generate(model, prompt, "off")
    fast, session = _generate(model, prompt, "lookup")
    with torch.inference_mode():
        expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert fast == plain == expected[0].tolist()
    assert plain_session.speculation.rounds == NEW_TOKENS  # one token per step without drafts
    stats = session.speculation
    assert stats.rounds + stats.accepted == NEW_TOKENS  # each round: its drafts kept, plus one
    if name == "copy":
        assert stats.accepted >= NEW_TOKENS // 4 and stats.rounds <= NEW_TOKENS * 3 // 4
        assert stats.drafted > stats.accepted  # some drafts were rejected and rolled back


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama of the same tokens with other random weights: a poor draft model."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("other-llama"), seed=1)


@pytest.mark.parametrize("drafter", ["itself", "another model"])
def test_draft_model_greedy_equals_plain_greedy(drafter, model, llama, other_llama, monkeypatch):
    """Drafts from a local model: the same tokens as plain decoding, whether the draft model
    is the swarm's own (every draft kept) or one of other weights (most rejected)."""
    ref = str(llama.path if drafter == "itself" else other_llama)
    monkeypatch.setattr(model, "draft_model", DraftModel.load(ref, llama))
    for prompt in (PROMPTS["random-a"], PROMPTS["copy"]):
        plain, _ = _generate(model, prompt, "off")
        drafted, session = _generate(model, prompt, "draft")
        assert drafted == plain
        stats = session.speculation
        assert stats.rounds + stats.accepted == NEW_TOKENS and stats.drafted > 0
        if drafter == "itself":  # only the last round's drafts may run past the end
            assert stats.accepted >= NEW_TOKENS * 3 // 4
        else:
            assert stats.accepted < stats.drafted


def test_draft_mode_without_a_draft_model_fails_before_opening_a_session(model) -> None:
    assert model.draft_model is None
    with pytest.raises(ValueError, match=r"'draft' needs a draft model"):
        model.generate(PROMPTS["copy"], max_new_tokens=4, speculative="draft")


def test_sampling_with_drafts_is_reproducible_with_a_seed(model) -> None:
    settings = dict(temperature=0.8, top_k=20, repetition_penalty=1.2, seed=5)
    first, session = _generate(model, COPY, "lookup", **settings)
    again, _ = _generate(model, COPY, "lookup", **settings)
    assert first == again and len(first) == COPY.shape[1] + NEW_TOKENS
    assert session.speculation.drafted > 0


def test_a_session_continues_after_an_end_mid_round_as_without_drafts(model) -> None:
    """A turn that ends inside a round of accepted drafts leaves the session exactly where plain
    decoding leaves it, so the next turn (only its own tokens) continues identically."""
    plain, _ = _generate(model, COPY, "off")
    stop_at = plain[COPY.shape[1] + 12]  # a token of the answer that also ends it there
    outputs = {}
    for mode in ("off", "lookup"):
        with model.inference_session(max_length=200) as session:
            turns = [
                model.generate(
                    prompt,
                    session=session,
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=[stop_at],
                    speculative=mode,
                )[0].tolist()
                for prompt in (COPY, _random(5, 3))
            ]
            outputs[mode] = (turns, session.position, _history_lengths(session))
            hops = len(session.route)
    assert outputs["lookup"] == outputs["off"]
    turns, position, histories = outputs["lookup"]
    assert turns[0][-1] == stop_at and histories == [position] * hops


class _Words:
    """A stand-in tokenizer for the API's text (the tiny model has none): token i is "wi "."""

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"w{token} " for token in tokens)


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_the_api_scheduler_speculates_with_the_same_replies(
    mode, model, llama, reference, monkeypatch
) -> None:
    """Requests stepped together by the API's scheduler, with drafts: each reply is plain
    greedy's, and drafts were accepted."""
    if mode == "draft":
        monkeypatch.setattr(model, "draft_model", DraftModel.load(str(llama.path), llama))
    made: list[Speculation] = []

    class Recorded(Speculation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(scheduler_module, "Speculation", Recorded)
    model.__dict__["tokenizer"] = _Words()  # the cached property, for this module's model
    scheduler = Scheduler(model, Metrics(), max_active=4)
    scheduler.start()
    events: dict[str, queue.Queue] = {name: queue.Queue() for name in PROMPTS}
    try:
        for name, prompt in PROMPTS.items():
            settings = GenerationConfig.build(
                model.generation_defaults,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=[],
                speculative=mode,
            )
            scheduler.submit(Job(Prompt(prompt), settings, (), events[name].put))
        for name, prompt in PROMPTS.items():
            text, finished = "", None
            while finished is None:
                event = events[name].get(timeout=120)
                if isinstance(event, Delta):
                    text += event.text
                else:
                    finished = event
            assert isinstance(finished, Finished) and finished.completion_tokens == NEW_TOKENS
            with torch.inference_mode():
                expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert text == _Words().decode(expected[0, prompt.shape[1] :].tolist())
        assert len(made) == len(PROMPTS)
        assert sum(s.stats.accepted for s in made) > 0
        assert all(s.stats.rounds + s.stats.accepted == NEW_TOKENS for s in made)
    finally:
        scheduler.stop()
        del model.__dict__["tokenizer"]


def test_peer_caches_after_a_rewind_equal_a_fresh_prefill_of_the_kept_tokens(
    model, reference
) -> None:
    head, prompt = model.head, _random(9, 4)
    sent = _random(5, 5)  # a new token and four drafts, of which two are kept
    branch = _random(1, 6)  # the token after the kept ones
    with model.inference_session(max_length=32) as session:
        session.step(head.embed(prompt))
        session.step(head.embed(sent))
        assert session.position == 14
        rewound = head.logits(session.step(head.embed(branch), position=12))
        assert _history_lengths(session) == [13, 13]
    kept = torch.cat([prompt, sent[:, :3], branch], dim=1)
    with model.inference_session(max_length=32) as fresh:
        prefilled = head.logits(fresh.step(head.embed(kept)))
    torch.testing.assert_close(rewound[:, -1], prefilled[:, -1], atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        expected = reference(kept).logits
    torch.testing.assert_close(rewound[:, -1], expected[:, -1], atol=1e-4, rtol=1e-4)


def test_rewinds_that_cross_a_failover_replay_only_the_kept_tokens(model, swarm, reference) -> None:
    """A peer killed after drafts were rejected: the replacement is rebuilt from the rewound
    history, and the output is still plain greedy's. (Runs last: it kills a peer.)"""
    with torch.inference_mode():
        expected = reference.generate(COPY, max_new_tokens=NEW_TOKENS, do_sample=False)
    with model.inference_session(max_length=COPY.shape[1] + NEW_TOKENS) as session:
        victim = swarm.peer(session.route[-1].peer_id)
        at_kill = {}

        def kill() -> None:
            stats = session.speculation
            at_kill.update(drafted=stats.drafted, accepted=stats.accepted)
            victim.send_signal(signal.SIGKILL)

        output = model.generate(
            COPY,
            session=session,
            streamer=AfterTokens(NEW_TOKENS // 2, kill),
            max_new_tokens=NEW_TOKENS,
            eos_token_id=[],
            speculative="lookup",
        )
        assert victim.peer_id not in {hop.peer_id for hop in session.route}
        assert at_kill["drafted"] > at_kill["accepted"]  # rejected drafts were rolled back
        assert _history_lengths(session) == [session.position] * len(session.route)
    assert output[0].tolist() == expected[0].tolist()
    assert victim.peer_id in model.bans.banned()
