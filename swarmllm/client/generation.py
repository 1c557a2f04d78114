"""The generation loop: embed, run the swarm, take logits, pick tokens, stop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
        stop_strings: str | Iterable[str] | None = None,
    ) -> GenerationConfig:
        """Settings for one ``generate`` call. ``do_sample`` defaults to True when a
        temperature, top-k or top-p is given; ``eos_token_id`` to the model's (``[]``: none)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample is None:
            do_sample = temperature != 1.0 or top_k is not None or top_p is not None
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
            sampling=SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed),
            eos_token_ids=eos_ids,
            stop_strings=tuple(stop_strings or ()),
            pad_token_id=pad,
        )


def generate_tokens(
    head: ModelHead,
    session: ClientSession,
    input_ids: torch.Tensor,
    settings: GenerationConfig,
    decode: Callable[[torch.Tensor], list[str]],
    streamer: Any = None,
    images: ImageInputs | None = None,
) -> torch.Tensor:
    """Prompt + generated tokens [batch, n]. Continues ``session`` if it already holds tokens:
    tokens it generated but never fed (the last one of a previous call) are fed first.
    ``images`` (positions relative to ``input_ids``) go with the prompt."""
    batch = input_ids.shape[0]
    history = input_ids
    if session.token_ids is not None:
        history = torch.cat([session.token_ids, input_ids], dim=1)
    to_feed = history[:, session.position :]
    if images is not None:
        images = images.shifted(history.shape[1] - input_ids.shape[1])
    sampler = TokenSampler(settings.sampling)
    eos = torch.tensor(sorted(settings.eos_token_ids), dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    generated: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(input_ids)
    profile = session.profile
    for _ in range(settings.max_new_tokens):
        phase = phase_of(to_feed.shape[1])
        with measure(profile, phase, "embed"):
            embedded = head.embed(to_feed)
        hidden = session.step(embedded, images=images)
        images = None  # the cache holds the image tokens now
        with measure(profile, phase, "head"):
            logits = head.logits(hidden[:, -1])
        with measure(profile, phase, "sampling"):
            tokens = sampler(history, logits)
        tokens = torch.where(finished, settings.pad_token_id, tokens)
        generated.append(tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)
        if streamer is not None:
            streamer.put(tokens)
        finished |= torch.isin(tokens, eos)
        if settings.stop_strings:
            texts = decode(torch.stack(generated, dim=1))
            finished |= torch.tensor(
                [any(s in text for s in settings.stop_strings) for text in texts]
            )
        if finished.all():
            break
        to_feed = tokens[:, None]
    if streamer is not None:
        streamer.end()
    session.token_ids = history
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
