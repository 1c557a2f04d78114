"""The generation loop over N sequences at once (``generate`` is N = 1).

Each sequence has its own inference session (its own streams and caches on the peers). Every
step sends all unfinished sequences' tokens concurrently, so each peer receives them together
and runs them as one batched forward; the client then runs the LM head once over every
sequence's last hidden state. A sequence that finishes leaves the batch; the others go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from swarmllm.blocks.head import ModelHead
from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.profile import measure, phase_of
from swarmllm.client.sampling import SamplingParams, TokenSampler

if TYPE_CHECKING:
    from swarmllm.client.model import ClientSession


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 0

    @classmethod
    def build(
        cls,
        defaults: Any,
        *,
        max_new_tokens: int = 32,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
        stop_strings: str | Iterable[str] | None = None,
    ) -> GenerationConfig:
        """Settings for one ``generate`` call; the ``swarmllm`` command decides the same way.

        Greedy unless sampling is asked for: ``do_sample`` defaults to True when a
        temperature, top-k or top-p is given; temperature 0 means greedy. A ``seed`` without
        sampling is an error rather than silently unused. ``eos_token_id`` defaults to the
        model's (``[]``: none)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:  # greedy, as in most chat front-ends
            if do_sample or top_k is not None or top_p is not None:
                raise ValueError("temperature 0 means greedy: it excludes sampling (top_k, top_p)")
            do_sample, temperature = False, None
        if do_sample is None:
            do_sample = temperature is not None or top_k is not None or top_p is not None
        if seed is not None and not do_sample:
            raise ValueError(
                "a seed needs sampling: also give a temperature, top_k or top_p "
                "(--temperature, --top-k, --top-p)"
            )
        if eos_token_id is None:
            eos_token_id = defaults.eos_token_id
        eos = [] if eos_token_id is None else eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        pad = defaults.pad_token_id
        if pad is None:
            pad = min(eos_ids, default=0)
        return cls(
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(
                do_sample, temperature or 1.0, top_k, top_p, repetition_penalty, seed
            ),
            eos_token_ids=eos_ids,
            stop_strings=tuple(stop_strings or ()),
            pad_token_id=pad,
        )


class _Sequence:
    """One session's part of a generation: what it must feed next, what it has made, and
    which of its rows have finished."""

    def __init__(
        self,
        session: ClientSession,
        prompt: torch.Tensor,
        settings: GenerationConfig,
        streamer: Any,
        images: ImageInputs | None,
    ):
        self.session, self.prompt, self.settings = session, prompt, settings
        # tokens the session generated but never fed (the last one of a previous call) go first
        self.history = prompt
        if session.token_ids is not None:
            self.history = torch.cat([session.token_ids, prompt], dim=1)
        self.to_feed = self.history[:, session.position :]
        offset = self.history.shape[1] - prompt.shape[1]
        self.images = images.shifted(offset) if images is not None else None
        self.sampler = TokenSampler(settings.sampling)
        self.streamer = streamer
        self.finished = torch.zeros(prompt.shape[0], dtype=torch.bool)
        self.generated: list[torch.Tensor] = []
        if streamer is not None:
            streamer.put(prompt)

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or len(self.generated) >= self.settings.max_new_tokens

    def accept(
        self, logits: torch.Tensor, eos: torch.Tensor, decode: Callable[[torch.Tensor], list[str]]
    ) -> None:
        tokens = self.sampler(self.history, logits)
        tokens = torch.where(self.finished, self.settings.pad_token_id, tokens)
        self.generated.append(tokens)
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        if self.streamer is not None:
            self.streamer.put(tokens)
        self.finished |= torch.isin(tokens, eos)
        if self.settings.stop_strings:
            texts = decode(torch.stack(self.generated, dim=1))
            stops = self.settings.stop_strings
            self.finished |= torch.tensor([any(s in text for s in stops) for text in texts])
        self.to_feed = tokens[:, None]

    def finish(self) -> torch.Tensor:
        if self.streamer is not None:
            self.streamer.end()
        self.session.token_ids = self.history
        return torch.cat([self.prompt, torch.stack(self.generated, dim=1)], dim=1)


def generate_tokens(
    head: ModelHead,
    sessions: Sequence[ClientSession],
    prompts: Sequence[torch.Tensor],
    settings: GenerationConfig,
    decode: Callable[[torch.Tensor], list[str]],
    *,
    streamers: Sequence[Any] | None = None,
    images: Sequence[ImageInputs | None] | None = None,
) -> list[torch.Tensor]:
    """Prompt + generated tokens [rows, n] for each session, stepped together.

    Each session continues from what it holds; ``images[i]`` (positions relative to
    ``prompts[i]``) go with that prompt. Each output equals what the session gives alone.
    """
    if not sessions:
        return []
    streamers = streamers or [None] * len(sessions)
    images = images or [None] * len(sessions)
    sequences = [
        _Sequence(session, prompt, settings, streamer, image)
        for session, prompt, streamer, image in zip(
            sessions, prompts, streamers, images, strict=True
        )
    ]
    connection, profile = sessions[0].model.connection, sessions[0].profile
    eos = torch.tensor(sorted(settings.eos_token_ids), dtype=torch.long)
    active = sequences
    while active:
        phase = phase_of(max(seq.to_feed.shape[1] for seq in active))
        with measure(profile, phase, "embed"):
            inputs = [head.embed(seq.to_feed) for seq in active]
        with measure(profile, phase, "swarm"):
            steps = [
                seq.session.step_async(x, images=seq.images)
                for seq, x in zip(active, inputs, strict=True)
            ]
            outputs = connection.run(gather_or_cancel(*steps))
        for seq in active:
            seq.images = None  # the caches hold the image tokens now
        with measure(profile, phase, "head"):
            last = torch.cat([output[:, -1] for output in outputs])
            logits = head.logits(last).split([seq.prompt.shape[0] for seq in active])
        with measure(profile, phase, "sampling"):
            for seq, rows in zip(active, logits, strict=True):
                seq.accept(rows, eos, decode)
        active = [seq for seq in active if not seq.done]
    return [seq.finish() for seq in sequences]


async def gather_or_cancel(*steps) -> list:
    """Run concurrently; on a failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
