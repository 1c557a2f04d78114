"""Several prompts generated at once as separate sessions, stepped together.

Each prompt gets its own inference session (its own streams and caches on the peers). Every
step sends all unfinished sessions' tokens concurrently, so each peer receives them together
and runs them as one batched forward; the client then runs the LM head once over every
session's last hidden state. A session that finishes leaves the batch; the others go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from swarmllm.client.generation import GenerationConfig
from swarmllm.client.profile import measure, phase_of
from swarmllm.client.sampling import TokenSampler
from swarmllm.client.session import InferenceSession
from swarmllm.protocol import WIRE_DTYPES

if TYPE_CHECKING:
    from swarmllm.client.model import DistributedModelForCausalLM


class _Generation:
    """One prompt's state: its session, the tokens so far and which rows have finished."""

    def __init__(self, session: InferenceSession, prompt: torch.Tensor, settings: GenerationConfig):
        self.session, self.prompt, self.settings = session, prompt, settings
        self.history = prompt
        self.to_feed = prompt
        self.sampler = TokenSampler(settings.sampling)
        self.finished = torch.zeros(prompt.shape[0], dtype=torch.bool)
        self.generated: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or len(self.generated) >= self.settings.max_new_tokens

    def accept(self, logits: torch.Tensor, eos: torch.Tensor) -> None:
        tokens = self.sampler(self.history, logits)
        tokens = torch.where(self.finished, self.settings.pad_token_id, tokens)
        self.generated.append(tokens)
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        self.finished |= torch.isin(tokens, eos)
        self.to_feed = tokens[:, None]

    def output(self) -> torch.Tensor:
        return torch.cat([self.prompt, torch.stack(self.generated, dim=1)], dim=1)


@torch.inference_mode()
def generate_concurrently(
    model: DistributedModelForCausalLM, prompts: Sequence[torch.Tensor], **config: Any
) -> list[torch.Tensor]:
    """Prompt + new tokens for each prompt ([rows, n] each, lengths may differ).

    ``config`` is ``generate``'s (max_new_tokens, sampling, eos_token_id), except stop
    strings. Each prompt's output equals what ``generate`` gives for it alone.
    """
    settings = GenerationConfig.build(model.generation_defaults, **config)
    if settings.stop_strings:
        raise ValueError("generate_concurrently does not take stop_strings")
    if not prompts:
        return []
    head, connection, profile = model.head, model.connection, model.profile
    wire = WIRE_DTYPES[model.wire_dtype]
    eos = torch.tensor(sorted(settings.eos_token_ids), dtype=torch.long)
    states = [
        _Generation(
            model.new_session(prompt.shape[1] + settings.max_new_tokens, prompt.shape[0]),
            prompt,
            settings,
        )
        for prompt in prompts
    ]
    try:
        connection.run(_gather(*(state.session.open() for state in states)))
        active = states
        while active:
            phase = phase_of(max(state.to_feed.shape[1] for state in active))
            with measure(profile, phase, "embed"):
                inputs = [head.embed(state.to_feed).to(wire) for state in active]
            with measure(profile, phase, "swarm"):
                outputs = connection.run(
                    _gather(*(s.session.step(x) for s, x in zip(active, inputs, strict=True)))
                )
            with measure(profile, phase, "head"):
                last = torch.cat([output[:, -1] for output in outputs]).to(head.lm_head.weight)
                logits = head.logits(last).split([state.prompt.shape[0] for state in active])
            with measure(profile, phase, "sampling"):
                for state, rows in zip(active, logits, strict=True):
                    state.accept(rows, eos)
            active = [state for state in active if not state.done]
    finally:
        connection.run(_close_all(states), timeout=10)
    return [state.output() for state in states]


async def _close_all(states: list[_Generation]) -> None:
    await asyncio.gather(*(state.session.close() for state in states), return_exceptions=True)


async def _gather(*steps) -> list:
    """Run concurrently; on a failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
