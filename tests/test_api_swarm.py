"""``swarmllm api`` in front of a real 3-peer swarm of the embedded model, through the official
``openai`` SDK, plain HTTP and a real headless Chromium: answers equal to the library's, errors
in the OpenAI shape, sessions freed on disconnect, concurrent requests batched on the peers."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from api_server import api_server
from prometheus_client.parser import text_string_to_metric_families
from readme_blocks import python_blocks

from swarmllm.assets import example_image
from swarmllm.blocks import shapes
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.vision import load_image
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = example_image("green_star.png")
ARTIFACTS = Path(os.environ.get("SWARMLLM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
KEY = "sk-test-key"
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def swarm(embedded_source: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(3, source=embedded_source, workdir=tmp_path_factory.mktemp("swarm")) as running:
        running.wait_until_ready(timeout=300)
        yield running


@pytest.fixture(scope="module")
def server(swarm: LocalSwarm) -> Iterator[str]:
    with api_server(swarm.initial_peers, swarm.workdir / "api.log", "--api-key", KEY) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    """The library on the same swarm: what the API's answers must equal."""
    with DistributedModelForCausalLM.from_pretrained(
        None, initial_peers=swarm.initial_peers
    ) as model:
        yield model


def _greedy(model: DistributedModelForCausalLM, ids, max_new_tokens: int, **kwargs) -> list[int]:
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return output[0, ids.shape[1] :].tolist()


def _text(model: DistributedModelForCausalLM, tokens: list[int]) -> str:
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def _peer_sessions(model: DistributedModelForCausalLM, swarm: LocalSwarm) -> list[int]:
    """Open sessions on every peer, as each peer's ``info`` reports them."""
    connection = model.connection
    return [connection.run(connection.info(p.peer_id), timeout=30).sessions for p in swarm.peers]


def _metric(server: str, name: str):
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return next(f for f in text_string_to_metric_families(text) if f.name == name)


def _batch_sizes(server: str) -> tuple[float, float]:
    """(observations, observations with batch 1) of the peers' reported batch sizes."""
    family = _metric(server, "swarmllm_api_peer_batch_size")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    count = samples[("swarmllm_api_peer_batch_size_count", None)]
    return count, samples[("swarmllm_api_peer_batch_size_bucket", "1.0")]


# ---------------------------------------------------------------- answers


def test_the_model_is_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "swarmllm"


def test_chat_equals_the_library_greedy_answer_whole_and_streamed(client, reference):
    ids = prompt_ids(reference.tokenizer, QUESTION)
    tokens = _greedy(reference, ids, 24)
    expected = _text(reference, tokens)
    assert expected == "The capital of France is Paris."
    messages = [{"role": "user", "content": QUESTION}]

    whole = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24
    )
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    usage = whole.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (ids.shape[1], len(tokens))
    assert usage.total_tokens == ids.shape[1] + len(tokens)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) > 3 and "".join(deltas) == expected  # token by token, not in one piece
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])


def test_a_token_limit_ends_with_length(client, reference):
    ids = prompt_ids(reference.tokenizer, QUESTION)
    expected = _text(reference, _greedy(reference, ids, 3))
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=3
    )
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3


def test_completions_equal_the_library_and_stop_at_a_stop_sequence(client, reference):
    prompt = "The capital of France is"
    ids = prompt_ids(reference.tokenizer, prompt, chat=False)
    expected = _text(reference, _greedy(reference, ids, 12, eos_token_id=[]))
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (ids.shape[1], 12)

    streamed = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected

    stop = expected.strip().split()[1]  # a word inside the answer
    cut = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=[stop]
    )
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_multi_turn_conversation_goes_through_the_chat_template(client, reference):
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    conversation = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    ids = reference.tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    expected = _text(reference, _greedy(reference, ids, 24))
    answer = client.chat.completions.create(
        model=MODEL, messages=conversation, temperature=0, max_tokens=24
    )
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == ids.shape[1]
    assert "Rome" in expected  # the second turn was read with the first


def test_an_image_question_is_answered_like_the_library(client, reference):
    question = "What is in the picture?"
    url = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    ids = reference.image_prompt(question)
    tokens = _greedy(reference, ids, 8, images=[load_image(EXAMPLE)])
    expected = _text(reference, tokens)
    assert shapes.answer_is_correct(question, expected, "star", "green"), expected
    content = [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8
    )
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == ids.shape[1]


def test_sampling_with_a_seed_repeats_and_differs_across_seeds(client):
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.5,
            top_p=0.95,
            seed=seed,
            max_tokens=8,
        )
        return answer.choices[0].message.content

    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3)}) > 1


# ---------------------------------------------------------------- errors


def _error_body(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"n": 2}, "n", "only n=1"),
        ({"max_tokens": 100_000}, "max_tokens", "exceeds the model's context"),
        (
            {"messages": [{"role": "user", "content": "word " * 5000}]},
            "messages",
            "peers take at most 4096",
        ),
        ({"messages": []}, "messages", "at least 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"logprobs": True}, "logprobs", "False"),
        ({"tools": [{"type": "function"}]}, "tools", "not permitted"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is it?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://example.com/a.png"},
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1].image_url.url",
            "fetches nothing from the internet",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, change, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    response = httpx.post(
        f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400
    error = _error_body(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_the_sdk_raises_a_bad_request_error_with_the_openai_body(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3
        )
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"


def test_a_missing_or_wrong_key_gets_401(server, client):
    missing = httpx.get(f"{server}/v1/models")
    assert missing.status_code == 401 and _error_body(missing)["code"] == "invalid_api_key"
    assert "Bearer" in _error_body(missing)["message"]
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # health and metrics need no key
    assert httpx.get(f"{server}/metrics").status_code == 200


def test_an_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert caught.value.status_code == 404 and error["param"] == "model"
    assert error["code"] == "model_not_found" and MODEL in error["message"]


# ---------------------------------------------------------------- sharing the swarm


def _cancelled(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    family = next(
        f for f in text_string_to_metric_families(text) if f.name == "swarmllm_api_cancelled"
    )
    return family.samples[0].value


def _server_log(swarm: LocalSwarm) -> str:
    """The end of the module's API server log: what a failure message should show."""
    return (swarm.workdir / "api.log").read_text(errors="replace")[-4000:]


def _wait_for_sessions(model, swarm, expected: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (sessions := _peer_sessions(model, swarm)) != expected:
        assert time.monotonic() < deadline, (
            f"peers hold {sessions} sessions, not {expected}; the server's log:\n"
            f"{_server_log(swarm)}"
        )
        time.sleep(0.2)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_mid_reply_frees_the_peer_sessions(
    server, swarm, reference, stream
):
    assert _peer_sessions(reference, swarm) == [0, 0, 0]
    cancelled = _cancelled(server)
    body = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 400,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with (
            httpx.Client(timeout=120) as http,
            http.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers) as sse,
        ):
            received = [line for line, _ in zip(sse.iter_lines(), range(8), strict=False) if line]
            log = _server_log(swarm)
            assert len(received) >= 3 and '"error"' not in "".join(received), (received, log)
            _wait_for_sessions(reference, swarm, [1, 1, 1], 10)  # the request is generating
    else:  # the client gives up waiting for the whole reply
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                httpx.post, f"{server}/v1/chat/completions", json=body, headers=headers,
                timeout=httpx.Timeout(30, read=6),
            )  # fmt: skip
            _wait_for_sessions(reference, swarm, [1, 1, 1], 30)
            with pytest.raises(httpx.ReadTimeout):
                waiting.result(60)
    # the peers expire idle sessions only after 300 s: this is the server closing them
    _wait_for_sessions(reference, swarm, [0, 0, 0], 10)
    assert _cancelled(server) == cancelled + 1


def test_eight_concurrent_streams_are_correct_and_batched_on_the_peers(client, server, reference):
    questions = [
        QUESTION,
        "What is 2 + 2?",
        "Name a colour.",
        "Who wrote Hamlet?",
        "What is the largest ocean?",
        "Say hello.",
        "What do bees make?",
        "Name a planet.",
    ]
    prompts = [prompt_ids(reference.tokenizer, q) for q in questions]
    outputs = reference.generate_concurrently(prompts, max_new_tokens=16, do_sample=False)
    expected = [
        _text(reference, o[0, p.shape[1] :].tolist()) for o, p in zip(outputs, prompts, strict=True)
    ]
    before = _batch_sizes(server)

    def ask(question: str) -> str:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=16,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    assert answers == expected

    after = _batch_sizes(server)
    steps, alone = after[0] - before[0], after[1] - before[1]
    assert steps >= 3 * 16  # every hop of every step reported its batch
    assert (steps - alone) / steps > 0.5, f"{alone} of {steps} hop steps ran unbatched"


def test_health_and_metrics(server):
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["model"] == MODEL
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("swarmllm_api_time_to_first_token_seconds_count", "swarmllm_api_requests_total"):
        assert name in metrics


# ---------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's Chromium, never a downloaded one."""
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium (scripts/install.sh does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def test_the_dashboard_lists_every_peer_with_its_span(browser, server, swarm):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector("#peers tbody tr", timeout=30_000)
    rows = page.locator("#peers tbody tr")
    shown = {
        rows.nth(i).get_attribute("data-peer-id"): rows.nth(i).get_attribute("data-span")
        for i in range(rows.count())
    }
    assert shown == {p.peer_id: f"{p.blocks[0]}-{p.blocks[1]}" for p in swarm.peers}
    # what only the peers' info answers tell: device and precision, open sessions
    for i in range(rows.count()):
        assert "cpu / float32" in rows.nth(i).inner_text()
    assert page.inner_text("#coverage-status") == "fully covered"
    assert page.locator("#coverage-bar > div.c1").count() == 30  # one peer on every block
    assert page.is_visible("#image-row")  # the embedded model takes pictures
    page.close()


def test_a_chat_message_streams_its_answer_into_the_page(browser, server, reference):
    expected = _text(reference, _greedy(reference, prompt_ids(reference.tokenizer, QUESTION), 24))
    page = browser.new_page(viewport={"width": 1400, "height": 820})
    page.goto(server)
    page.wait_for_selector("#peers tbody tr", timeout=30_000)
    page.fill("#api-key", KEY)
    page.fill("#max-tokens", "24")
    # record the reply's text each time the page changes it
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant');
            if (replies.length) window.seen.push(replies[replies.length - 1].textContent);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true}); }"""
    )
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_selector(".message.assistant.done", timeout=60_000)
    assert page.inner_text(".message.assistant") == expected
    seen = [text for text in page.evaluate("window.seen") if text]
    assert len(set(seen)) > 3 and seen[-1] == expected  # it grew token by token
    assert all(expected.startswith(text) for text in seen)
    page.wait_for_function(
        "document.querySelectorAll('#route li').length === 3", timeout=10_000
    )  # the route of this reply: every hop of the swarm, highlighted in the peers' rows
    route = page.inner_text("#route")
    assert all(f"blocks {a}–{b}" in route for a, b in ((0, 9), (10, 19), (20, 29)))
    assert page.locator("#peers tr.routed").count() == 3
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "api-page.png"))
    page.close()


def test_a_picture_from_the_picker_is_asked_about(browser, server, reference):
    question = "What is in the picture?"
    ids = reference.image_prompt(question)
    expected = _text(reference, _greedy(reference, ids, 8, images=[load_image(EXAMPLE)]))
    page = browser.new_page(viewport={"width": 1400, "height": 820})
    page.goto(server)
    page.wait_for_selector("#image-row:not([hidden])", timeout=30_000)
    page.fill("#api-key", KEY)
    page.fill("#max-tokens", "8")
    page.set_input_files("#image-input", str(EXAMPLE))
    page.wait_for_selector("#image-preview:not([hidden])")
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_selector(".message.assistant.done", timeout=60_000)
    assert page.inner_text(".message.assistant") == expected
    assert page.locator(".message.user img").count() == 1  # the picture shows with the question
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "api-page-image.png"))
    page.close()


# ---------------------------------------------------------------- the swarm failing


def test_a_peer_lost_midway_ends_the_stream_with_an_error_then_503(swarm, tmp_path):
    """A second server, so its ban of the stopped peer leaves the module's server alone."""
    last = swarm.peers[-1]  # the only peer serving blocks 20-29
    with api_server(swarm.initial_peers, tmp_path / "api.log", "--timeout", "2") as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long essay about rivers."}],
            temperature=0,
            max_tokens=400,
            stream=True,
        )
        try:
            received = []
            with pytest.raises(openai.APIError) as caught:
                for chunk in stream:
                    received.append(chunk)
                    if len(received) == 3:
                        last.send_signal(signal.SIGSTOP)
            assert len(received) >= 3
            assert "blocks 20-29" in caught.value.message
            assert caught.value.body["type"] == "service_unavailable_error"

            with pytest.raises(openai.APIStatusError) as refused:
                sdk.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}]
                )
            assert refused.value.status_code == 503
            assert refused.value.body["code"] == "model_not_covered"
            assert "blocks 20-29" in refused.value.body["message"]
            health = httpx.get(f"{base}/health", timeout=30)
            assert health.status_code == 503 and "blocks 20-29" in _error_body(health)["message"]
        finally:
            last.send_signal(signal.SIGCONT)


def test_the_readme_openai_example_runs_as_written(server):
    blocks = python_blocks(containing="OpenAI(")
    assert blocks, "the README has no openai SDK example"
    for code in blocks:
        code = code.replace("http://localhost:8000/v1", f"{server}/v1").replace("sk-mine", KEY)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "the example printed no answer"
