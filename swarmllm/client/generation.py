"""The generation loop over N sequences at once (``generate`` is N = 1).

Each sequence has its own inference session (its own streams and caches on the peers). Every
step sends all unfinished sequences' tokens concurrently, so each peer receives them together
and runs them as one batched forward; the client then runs the LM head once over every
sequence's last hidden state. A sequence that finishes leaves the batch; the others go on.

With speculative decoding (``speculative="lookup"`` or ``"draft"``, one-row sessions) a round
sends the new token followed by draft tokens in one step, the LM head runs at every one of
those positions, and the sampler keeps the longest prefix of drafts the model agrees with plus
one token of its own (``TokenSampler.verify``). The session then rewinds to the last kept
token: its per-hop history (what a failover replays) at once, the peers' caches at the next
step, whose position tells them where to cut. Every round thus gives one to k + 1 tokens for
one trip through the chain, and the tokens are those (greedy) or distributed as those
(sampling) of plain decoding.

With verification on, a spot-check may catch a hop lying after its outputs went on: its
session rewinds (``SessionRewound``) and the sequence drops the tokens made since and makes
them again. When every sequence is done, each session is checked once
more, whole (``audit``), and a sequence whose check finds a lie goes back to generating. The
result then holds only tokens computed from outputs that passed a check; a streamer has
already been given the dropped ones (a warning says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from swarmllm.blocks.head import ModelHead
from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.drafting import (
    DraftLength,
    PromptLookup,
    SpeculationStats,
    check_speculative,
)
from swarmllm.client.profile import measure, phase_of
from swarmllm.client.sampling import SamplingParams, TokenSampler
from swarmllm.client.session import SessionFailedError, SessionRewound

if TYPE_CHECKING:
    from swarmllm.client.draft_model import DraftModel, ModelDrafter
    from swarmllm.client.model import ClientSession

logger = logging.getLogger("swarmllm.client")

# times one sequence may go back to generating after a lie was caught (each time the liar is
# banned, so only a swarm of many liars gets there)
MAX_REGENERATIONS = 8


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 0
    speculative: str = "off"

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
        speculative: str = "off",
    ) -> GenerationConfig:
        """Settings for one ``generate`` call; the ``swarmllm`` command decides the same way.

        Greedy unless sampling is asked for: ``do_sample`` defaults to True when a
        temperature, top-k or top-p is given; temperature 0 means greedy. A ``seed`` without
        sampling is an error rather than silently unused. ``eos_token_id`` defaults to the
        model's (``[]``: none). ``speculative``: "off", "lookup" or "draft" (see the module)."""
        check_speculative(speculative)  # whether this client has a draft model is not known here
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
            speculative=speculative,
        )


class Speculation:
    """Drafts and their verification for one sequence of one row (the API's requests use it
    too): ``plan`` the drafts of a round, then ``tokens`` from the logits at every fed draft."""

    def __init__(
        self,
        sampler: TokenSampler,
        mode: str,
        stats: SpeculationStats | None = None,
        draft_model: DraftModel | None = None,
    ):
        check_speculative(mode, draft_model is not None)
        self.sampler = sampler
        self.drafter: PromptLookup | ModelDrafter | None = None
        if mode == "lookup":
            self.drafter = PromptLookup()
        elif mode == "draft" and draft_model is not None:
            self.drafter = draft_model.drafter()
        self.length = DraftLength()
        self.stats = stats if stats is not None else SpeculationStats()
        self.drafts = torch.zeros(1, 0, dtype=torch.long)

    def plan(self, history: torch.Tensor, room: int) -> torch.Tensor:
        """This round's drafts [1, k] (k <= ``room``, maybe 0) to follow ``history`` [1, n]."""
        self.drafts = history[:, :0]
        # drafts need one position for every row: only one-row sequences speculate
        if self.drafter is not None and history.shape[0] == 1:
            limit = min(self.length.current, room)
            self.drafts = self.drafter.propose(history[0], limit)[None]
        return self.drafts

    def tokens(self, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The round's new tokens [rows, 1 + kept drafts] from ``logits`` [rows, k + 1, vocab]
        at the last position before the drafts and at each draft."""
        drafted = self.drafts.shape[1]
        self.stats.rounds += 1
        if not drafted:
            return self.sampler(history, logits[:, 0])[:, None]
        tokens, accepted = self.sampler.verify(history, logits, self.drafts)
        kept = int(accepted[0])
        self.length.update(drafted, kept)
        self.stats.drafted += drafted
        self.stats.accepted += kept
        return tokens[:, : kept + 1]


class _Sequence:
    """One session's part of a generation: what it must feed next (and the drafts that follow
    it), what it has made, and which of its rows have finished."""

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
        self.eos = torch.tensor(sorted(settings.eos_token_ids), dtype=torch.long)
        self.regenerations = 0
        self.sampler = TokenSampler(settings.sampling)
        self.speculation = Speculation(
            self.sampler, settings.speculative, session.speculation, session.model.draft_model
        )
        self.streamer = streamer
        self.finished = torch.zeros(prompt.shape[0], dtype=torch.bool)
        self.generated: list[torch.Tensor] = []
        if streamer is not None:
            streamer.put(prompt)

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or len(self.generated) >= self.settings.max_new_tokens

    @property
    def drafts(self) -> torch.Tensor:
        return self.speculation.drafts

    def plan(self) -> torch.Tensor:
        """The tokens of this round's step: what must be fed, then any drafts."""
        room = min(
            self.settings.max_new_tokens - len(self.generated) - 1,  # the last one needs none
            self.session.max_length - self.session.position - self.to_feed.shape[1],
        )
        return torch.cat([self.to_feed, self.speculation.plan(self.history, room)], dim=1)

    def accept(self, logits: torch.Tensor, decode: Callable[[torch.Tensor], list[str]]) -> None:
        """Take this round's tokens from ``logits`` [rows, drafts + 1, vocab] and rewind the
        session to the last one of them (which, as in plain decoding, it does not hold yet)."""
        for column in self.speculation.tokens(self.history, logits).unbind(dim=1):
            self._take(column, decode)
            if self.done:
                break
        self.to_feed = self.history[:, -1:]
        if self.session.position > self.history.shape[1] - 1:
            self.session.rewind(self.history.shape[1] - 1)

    def regenerate(self, decode: Callable[[torch.Tensor], list[str]]) -> None:
        """The session forgot every token from its position on (a hop it caught lying had a
        hand in them): drop the tokens sampled since and feed the token there again."""
        position = self.session.position
        self.regenerations += 1
        if self.regenerations > MAX_REGENERATIONS:
            raise SessionFailedError(
                f"peers were caught lying {self.regenerations} times in one generation"
            )
        first_generated = self.history.shape[1] - len(self.generated)
        kept = max(position + 1, first_generated)  # the token at ``position`` came before
        dropped = self.history.shape[1] - kept
        if self.streamer is not None and dropped:
            logger.warning(
                "the last %d streamed token(s) came from a peer caught lying; they are made again",
                dropped,
            )
        self.history = self.history[:, :kept]
        self.generated = self.generated[: kept - first_generated]
        self.to_feed = self.history[:, position:]
        self.finished = torch.zeros_like(self.finished)
        for tokens in self.generated:
            self._mark_finished(tokens, decode)

    def _take(self, tokens: torch.Tensor, decode: Callable[[torch.Tensor], list[str]]) -> None:
        tokens = torch.where(self.finished, self.settings.pad_token_id, tokens)
        self.generated.append(tokens)
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        if self.streamer is not None:
            self.streamer.put(tokens)
        self._mark_finished(tokens, decode)

    def _mark_finished(self, tokens: torch.Tensor, decode: Callable[[torch.Tensor], list[str]]):
        """Rows whose new ``tokens`` end them: an EOS, or a stop string in the text so far."""
        self.finished |= torch.isin(tokens, self.eos)
        if self.settings.stop_strings:
            texts = decode(torch.stack(self.generated, dim=1))
            stops = self.settings.stop_strings
            self.finished |= torch.tensor([any(s in text for s in stops) for text in texts])

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
    active, unaudited = sequences, sequences
    while active:
        feeds = [seq.plan() for seq in active]
        phases = [
            phase_of(feed.shape[1], seq.drafts.shape[1])
            for seq, feed in zip(active, feeds, strict=True)
        ]
        phase = next((name for name in ("prefill", "verify") if name in phases), "decode")
        with measure(profile, phase, "embed"):
            inputs = [head.embed(feed) for feed in feeds]
        with measure(profile, phase, "swarm"):
            steps = [
                _step(seq, x, seq_phase)
                for seq, x, seq_phase in zip(active, inputs, phases, strict=True)
            ]
            outputs = connection.run(gather_or_cancel(*steps))
        rewound = [seq for seq, output in zip(active, outputs, strict=True) if output is None]
        for seq in rewound:
            seq.regenerate(decode)
        stepped = [(seq, out) for seq, out in zip(active, outputs, strict=True) if out is not None]
        if stepped:
            _take_tokens(head, stepped, profile, phase, decode)
        active = [seq for seq in sequences if not seq.done]
        if not active:  # every sequence is done: check each one whole once, surely
            active = unaudited = _caught_lying(connection, unaudited, decode)
    return [seq.finish() for seq in sequences]


def _take_tokens(
    head: ModelHead,
    stepped: list[tuple[_Sequence, torch.Tensor]],
    profile: Any,
    phase: str,
    decode: Callable[[torch.Tensor], list[str]],
) -> None:
    """Run the LM head once over every stepped sequence's new positions and let each take
    its tokens."""
    for seq, _ in stepped:
        seq.images = None  # the caches hold the image tokens now
    with measure(profile, phase, "head"):
        # the last position of what was fed, and every draft's
        shapes = [(seq.prompt.shape[0], seq.drafts.shape[1] + 1) for seq, _ in stepped]
        last = torch.cat(
            [
                output[:, -width:].reshape(rows * width, -1)
                for (_, output), (rows, width) in zip(stepped, shapes, strict=True)
            ]
        )
        logits = head.logits(last).split([rows * width for rows, width in shapes])
    with measure(profile, phase, "sampling"):
        for (seq, _), rows, (count, width) in zip(stepped, logits, shapes, strict=True):
            seq.accept(rows.reshape(count, width, -1), decode)


def _caught_lying(
    connection: Any, sequences: list[_Sequence], decode: Callable[[torch.Tensor], list[str]]
) -> list[_Sequence]:
    """The sequences whose closing check caught a lie, each rewound past it."""
    clean = connection.run(gather_or_cancel(*(_audit(seq) for seq in sequences)))
    caught = [seq for seq, passed in zip(sequences, clean, strict=True) if not passed]
    for seq in caught:
        seq.regenerate(decode)
    return caught


async def _step(seq: _Sequence, hidden: torch.Tensor, phase: str) -> torch.Tensor | None:
    """The sequence's step through the swarm, or None when its session rewound (a hop was
    caught lying after its outputs went on)."""
    try:
        return await seq.session.step_async(hidden, images=seq.images, phase=phase)
    except SessionRewound as rewound:
        logger.warning("%s; generating from there again", rewound)
        return None


async def _audit(seq: _Sequence) -> bool:
    """Whether the sequence's session passes a check of every hop's whole history (when it
    does not, the session has rewound past the lie)."""
    try:
        await seq.session.audit_async()
    except SessionRewound as rewound:
        logger.warning("closing check: %s; generating from there again", rewound)
        return False
    return True


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
