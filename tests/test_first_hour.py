"""A new user's first hour against a real 3-peer swarm of the embedded model: multi-turn chat
(API and ``swarmllm chat``), the README's Python example, sampling flags, ``--stop``, a prompt
from stdin, and Ctrl-C at any moment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from cli_runner import run_cli
from readme_blocks import python_blocks
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

SYSTEM = "You are a concise assistant."
QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"]
TURN_TOKENS = 24
NOISE = ("Task was destroyed", "Event loop is closed", "Traceback", "Exception ignored")


@pytest.fixture(scope="module")
def swarm(embedded_source: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(3, source=embedded_source, workdir=tmp_path_factory.mktemp("swarm")) as running:
        running.wait_until_ready(timeout=300)
        yield running


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers) as m:
        yield m


@pytest.fixture(scope="module")
def reference_replies(embedded_source: ModelSource, model) -> list[str]:
    """transformers' greedy replies, each turn generated from the whole conversation so far,
    rendered by the chat template."""
    reference = AutoModelForCausalLM.from_pretrained(embedded_source.path, dtype=torch.float32)
    tokenizer = model.tokenizer
    messages = [{"role": "system", "content": SYSTEM}]
    replies = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = reference.eval().generate(ids, max_new_tokens=TURN_TOKENS, do_sample=False)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_a_three_turn_chat_equals_transformers_on_the_whole_conversation(
    model, embedded_source, reference_replies
):
    reference = AutoModelForCausalLM.from_pretrained(embedded_source.path, dtype=torch.float32)
    with model.chat_session(system=SYSTEM, max_new_tokens=TURN_TOKENS) as chat:
        sent: list[int] = []  # tokens of each step that went to the swarm
        step = chat.session.step_async

        def recording(hidden, *args, **kwargs):
            sent.append(hidden.shape[1])
            return step(hidden, *args, **kwargs)

        chat.session.step_async = recording
        held_before = 0
        for turn, question in enumerate(QUESTIONS):
            sent.clear()
            reply = chat.send(question)
            assert reply == reference_replies[turn]
            # the session holds exactly the template's rendering of the whole conversation,
            # and transformers continues it with the same tokens
            whole = model.tokenizer.apply_chat_template(
                chat.messages[:-1],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            held = chat.token_ids
            assert held[0, : whole.shape[1]].tolist() == whole[0].tolist()
            with torch.no_grad():
                expected = reference.eval().generate(
                    whole, max_new_tokens=TURN_TOKENS, do_sample=False
                )
            assert held[0].tolist() == expected[0].tolist()
            # only the new turn went to the swarm (after the previous reply's last token, which
            # was generated but not yet fed), then one token per step
            assert sent[0] == whole.shape[1] - held_before + (1 if turn else 0)
            assert set(sent[1:]) <= {1}
            held_before = held.shape[1]


def test_the_chat_command_scripted_prints_one_line_per_reply_and_resets(swarm, reference_replies):
    lines = [*QUESTIONS, "/reset", QUESTIONS[0]]
    result = run_cli(
        "chat",
        "--initial-peers",
        *swarm.initial_peers,
        "--system",
        SYSTEM,
        "--max-new-tokens",
        str(TURN_TOKENS),
        input="\n".join(lines) + "\n",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    flat = [" ".join(reply.split()) for reply in reference_replies]
    assert result.stdout.splitlines() == [*flat, flat[0]]
    assert result.stderr == ""


def _run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


def test_the_readme_python_examples_run_as_written_and_print_clean_text(swarm):
    blocks = python_blocks(containing='"/ip4/…/p2p/…"')
    assert blocks, "the README has no Python example of the client library"
    address = swarm.initial_peers[0]
    for code in blocks:
        result = _run_python(code.replace("/ip4/…/p2p/…", address))
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout and "Rome" in result.stdout
        assert "<|" not in result.stdout and "system" not in result.stdout  # no template
        for noise in NOISE:
            assert noise not in result.stderr, result.stderr


def test_a_model_left_open_closes_cleanly_at_exit_and_when_collected(swarm):
    code = f"""
import gc
from swarmllm.client.model import DistributedModelForCausalLM
peers = {swarm.initial_peers!r}
model = DistributedModelForCausalLM.from_pretrained(None, initial_peers=peers)
print(model.generate_text("What is the capital of France?", max_new_tokens=8))
del model
gc.collect()
model = DistributedModelForCausalLM.from_pretrained(None, initial_peers=peers)
print(model.generate_text("What is the capital of France?", max_new_tokens=8))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Paris") == 2, result.stdout
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr


def test_cli_sampling_flags_sample_as_the_api_does(swarm, model):
    question = "Name a colour."
    # the CLI drafts by default (--speculative lookup); a seed's sample depends on that too
    settings = dict(top_k=50, seed=3, max_new_tokens=12, speculative="lookup")
    api = model.generate_text(question, **settings)
    assert api != model.generate_text(question, max_new_tokens=12)  # it did sample
    result = run_cli(
        "generate",
        "--initial-peers",
        *swarm.initial_peers,
        "--chat",
        "--top-k",
        "50",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
        question,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == api.strip()

    greedy_seed = run_cli("generate", "--initial-peers", *swarm.initial_peers, "--seed", "3", "hi")
    assert greedy_seed.returncode == 1
    assert greedy_seed.stderr.strip().splitlines() == [
        "error: a seed needs sampling: also give a temperature, top_k or top_p "
        "(--temperature, --top-k, --top-p)"
    ]


def test_generate_reads_the_prompt_from_stdin_stops_at_a_string_and_reports_speed(swarm):
    result = run_cli(
        "generate",
        "--initial-peers",
        *swarm.initial_peers,
        "--chat",
        "--stop",
        "never-said",
        "--stop",
        "Paris",
        "-",
        input="What is the capital of France?\n",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("Paris"), result.stdout
    assert re.fullmatch(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)\n", result.stderr)


def _interrupt(args: list[str], wait_for_output: bool, delay: float = 0.0):
    """Start ``swarmllm *args`` in its own process group, send the group SIGINT (as a
    terminal's Ctrl-C does) once it printed something or after ``delay``, and return its exit
    code, stderr and whether any process of the group outlived it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "swarmllm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        if wait_for_output:
            assert process.stdout.read(8), "no output before Ctrl-C"
        else:
            time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return process.returncode, stderr, False
            time.sleep(0.2)
        return process.returncode, stderr, True
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.parametrize("moment", ["start-up", "joining", "decode"])
def test_ctrl_c_prints_one_line_closes_everything_and_exits_130(swarm, moment):
    question = "Write a long story about a dragon and a knight."
    args = ["generate", "--initial-peers", *swarm.initial_peers, "--chat", question]
    args += ["--max-new-tokens", "400"]
    delays = {"start-up": 2.0, "joining": 6.0}  # into imports; loading and joining
    code, stderr, leftover = _interrupt(args, moment == "decode", delays.get(moment, 0.0))
    assert code == 130, stderr
    assert len(stderr.strip().splitlines()) <= 1, stderr
    assert not leftover, "a process of the command outlived it"
