"""Held-out accuracy of the embedded model's vision adapter, through a local swarm and locally.

Draws the held-out pictures (``swarmllm.blocks.shapes.scenes("heldout")``), asks each of the
three trained questions about every picture, and grades the greedy answers. The same prompts
run through a local swarm of three peers and through the same weights chained in-process;
the two must give the same answers.

    .venv/bin/python scripts/bench_vision.py --images 40
"""

from __future__ import annotations

import argparse
import os
import time

# Idle OpenMP threads must sleep, not spin, beside the swarm's peers on the same cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from swarmllm.blocks.local_vision import LocalVisionChain
from swarmllm.blocks.shapes import QUESTIONS, answer_is_correct, scenes
from swarmllm.blocks.sources import resolve_model
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

MAX_NEW_TOKENS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="held-out pictures to ask about")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="which held-out draw")
    args = parser.parse_args()

    source = resolve_model()
    local = LocalVisionChain.load(source)
    tokenizer = source.load_tokenizer()
    eos = [tokenizer.eos_token_id]
    pictures = scenes("heldout", args.images, seed=args.seed)
    cases = [(scene, question) for scene in pictures for question in QUESTIONS]
    print(f"{len(pictures)} held-out pictures x {len(QUESTIONS)} questions = {len(cases)} cases")

    started = time.monotonic()
    local_answers = []
    for scene, question in cases:
        ids = local.encoder.prompt_ids(tokenizer, question, 1, chat=True)
        tokens = local.generate_greedy(ids, [scene.draw()], MAX_NEW_TOKENS, eos)
        local_answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    local_seconds = time.monotonic() - started

    with LocalSwarm(args.peers, source=source) as swarm:
        swarm.wait_until_ready(timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers
        ) as model:
            started = time.monotonic()
            swarm_answers = []
            for scene, question in cases:
                ids = model.image_prompt(question)
                output = model.generate(
                    ids, images=[scene.draw()], max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos
                )
                new = output[0, ids.shape[1] :]
                swarm_answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
            swarm_seconds = time.monotonic() - started

    report(cases, "local", local_answers, local_seconds)
    report(cases, "swarm", swarm_answers, swarm_seconds)
    same = sum(a == b for a, b in zip(local_answers, swarm_answers, strict=True))
    print(f"swarm and local answers identical: {same}/{len(cases)}")
    for (scene, question), got, want in zip(cases, swarm_answers, local_answers, strict=True):
        if not answer_is_correct(question, got, scene.shape, scene.colour) or got != want:
            print(f"  {scene.colour} {scene.shape} | {question} -> swarm {got!r}, local {want!r}")


def report(cases, name: str, answers: list[str], seconds: float) -> None:
    correct = [
        answer_is_correct(question, reply, scene.shape, scene.colour)
        for (scene, question), reply in zip(cases, answers, strict=True)
    ]
    by_question = {
        question: sum(ok for (_, q), ok in zip(cases, correct, strict=True) if q == question)
        for question in QUESTIONS
    }
    per_question = ", ".join(
        f"{q!r} {n}/{len(cases) // len(QUESTIONS)}" for q, n in by_question.items()
    )
    print(
        f"{name}: held-out accuracy {sum(correct)}/{len(cases)} = "
        f"{sum(correct) / len(cases):.1%} ({per_question}); {seconds:.0f} s"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
