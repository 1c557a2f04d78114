"""Steps every active request together, so that the peers batch them.

One thread owns the generation of all requests. Each round it sends every active request's
next input (a new request's prompt, everyone else's last token) through its own inference
session concurrently, so the steps reach each peer together and the peer runs them as one
batched forward pass (``peer/batching.py``). Then it runs the LM head once over all the last
hidden states and samples each request's token with that request's own settings. A request
that finishes, fails or is cancelled (its HTTP client went away) leaves between two rounds and
its session is closed on the peers at once; a new request joins at the next round. A new
request's prompt pass runs in the round it joins, so that round's tokens of the others wait for
it (there is no chunked prefill). With ``swarmllm api --speculative lookup`` (or ``draft``) a
request's step may carry draft tokens after its new one and give several tokens
(``client.generation``); peers run such a step alone rather than in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from swarmllm.api.prompts import Prompt
from swarmllm.api.text import TextStream
from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.generation import GenerationConfig, Speculation
from swarmllm.client.sampling import TokenSampler
from swarmllm.client.session import InferenceSession
from swarmllm.protocol import WIRE_DTYPES

if TYPE_CHECKING:
    from swarmllm.api.metrics import Metrics
    from swarmllm.client.draft_model import DraftModel
    from swarmllm.client.model import DistributedModelForCausalLM

logger = logging.getLogger("swarmllm.api")

# Requests stepped together; later ones wait for a place. Peers hold at most
# --max-sessions-per-peer (default 8) sessions of one client, and this server is one client.
MAX_ACTIVE = 8
ROUND_TIMEOUT = 600.0  # a round's steps have their own timeouts and failover; this bounds all
IDLE_WAIT = 0.5  # seconds the idle scheduler sleeps between checks for new requests


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException
    sent_tokens: int  # tokens the request had produced before it failed


Event = Delta | Finished | Failed


@dataclass
class Job:
    """One request: what to generate, and where its events go (``sink`` is thread-safe)."""

    prompt: Prompt
    settings: GenerationConfig
    stop: tuple[str, ...]
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class HopReport:
    """One hop of the route a reply took, as its peer reported its last step."""

    peer_id: str
    start: int
    end: int
    batch: int
    compute_ms: float
    round_trip_ms: float


class _Generation:
    """A job being generated: its session, its tokens so far, its text."""

    def __init__(
        self,
        job: Job,
        session: InferenceSession,
        images: ImageInputs | None,
        decode,
        draft_model: DraftModel | None,
    ):
        self.job, self.session, self.images = job, session, images
        self.history = job.prompt.ids
        self.to_feed = job.prompt.ids
        self.sampler = TokenSampler(job.settings.sampling)
        self.speculation = Speculation(self.sampler, job.settings.speculative, None, draft_model)
        self.text = TextStream(decode, job.stop)
        self.generated = 0
        self.opened = False
        self.done = False

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.opened:
            await self.session.open()
            self.opened = True
        images, self.images = self.images, None  # the cache holds them after the prompt
        wire_images = images.to(hidden.dtype) if images is not None else None
        return await self.session.step(hidden, images=wire_images)

    def plan(self) -> torch.Tensor:
        """This round's tokens: what must be fed, then any drafts (``speculative``)."""
        room = min(
            self.job.settings.max_new_tokens - self.generated - 1,
            self.session.spec.max_length - self.session.position - self.to_feed.shape[1],
        )
        return torch.cat([self.to_feed, self.speculation.plan(self.history, room)], dim=1)

    def accept_round(self, logits: torch.Tensor, eos: frozenset[int]) -> int:
        """Take the round's tokens from ``logits`` [1, drafts + 1, vocab] (see
        ``client.generation``), rewind the session to the last; returns how many."""
        tokens = self.speculation.tokens(self.history, logits)[0].tolist()
        taken = 0
        for token in tokens:
            self.accept(token, eos)
            taken += 1
            if self.done:
                break
        self.to_feed = self.history[:, -1:]
        if self.session.position > self.history.shape[1] - 1:
            self.session.rewind(self.history.shape[1] - 1)
        return taken

    def accept(self, token: int, eos: frozenset[int]) -> None:
        """Add ``token`` to the reply, emit its text."""
        self.generated += 1
        self.history = torch.cat([self.history, self.history.new_tensor([[token]])], dim=1)
        if token in eos:
            self._emit(self.text.flush())
            self.finish("stop")
            return
        self._emit(self.text.push(token))
        if self.text.stopped:
            self.finish("stop")
        elif self.generated >= self.job.settings.max_new_tokens:
            self._emit(self.text.flush())
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.done = True
        prompt_tokens = self.job.prompt.ids.shape[1]
        self.job.sink(Finished(reason, prompt_tokens, self.generated))

    def fail(self, error: BaseException) -> None:
        self.done = True
        self.job.sink(Failed(error, self.generated))

    def _emit(self, text: str) -> None:
        if text:
            self.job.sink(Delta(text))


class Scheduler:
    def __init__(
        self,
        model: DistributedModelForCausalLM,
        metrics: Metrics,
        max_active: int = MAX_ACTIVE,
    ):
        self.model, self.metrics, self.max_active = model, metrics, max_active
        self.last_route: list[HopReport] = []  # of the latest reply that finished
        self.departures = 0  # requests that have left (finished, failed or cancelled)
        self._pending: queue.Queue[Job] = queue.Queue()
        self._active: list[_Generation] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmllm-scheduler", daemon=True)
        self._wire = WIRE_DTYPES[model.wire_dtype]

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the server is shutting down")
        self._pending.put(job)
        self.metrics.queued.inc()

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._admit()
                self._leave()
                if self._active:
                    try:
                        self._round()
                    except Exception as e:  # a bug here must fail the requests, not hang them
                        logger.exception("a scheduler round failed")
                        for generation in self._active:
                            generation.fail(e)
                    self._leave()
            for generation in self._active:
                generation.fail(RuntimeError("the server is shutting down"))
            self._leave()

    def _admit(self) -> None:
        """Take waiting jobs while there is room; sleep a little when there is nothing to do."""
        wait = IDLE_WAIT if not self._active else 0.0
        while len(self._active) < self.max_active:
            try:
                job = self._pending.get(timeout=wait) if wait else self._pending.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            self.metrics.queued.dec()
            if job.cancelled.is_set():
                continue
            try:
                self._active.append(self._start(job))
            except Exception as e:
                job.sink(Failed(e, 0))
        self.metrics.active.set(len(self._active))

    def _start(self, job: Job) -> _Generation:
        model = self.model
        images = None
        adapter = None
        if job.prompt.images:
            images = model.image_encoder.image_inputs(job.prompt.ids, job.prompt.images)
            adapter = model.image_encoder.adapter_name
        max_length = job.prompt.ids.shape[1] + job.settings.max_new_tokens
        session = model.new_session(max_length, adapter=adapter)
        return _Generation(job, session, images, self._decode, model.draft_model)

    def _leave(self) -> None:
        """Close the sessions of finished and cancelled requests on the peers now."""
        staying = []
        for generation in self._active:
            if generation.job.cancelled.is_set() and not generation.done:
                generation.done = True
                self.metrics.cancelled.inc()
            if generation.done:
                self.departures += 1
                if generation.opened:
                    self._close(generation.session)
            else:
                staying.append(generation)
        self._active = staying
        self.metrics.active.set(len(staying))

    def _close(self, session: InferenceSession) -> None:
        future = asyncio.run_coroutine_threadsafe(session.close(), self.model.connection.loop)
        future.add_done_callback(_log_close_failure)

    def _round(self) -> None:
        model, head = self.model, self.model.head
        active = list(self._active)
        inputs = [head.embed(g.plan()).to(self._wire) for g in active]
        outputs = model.connection.run(
            _settle([g.step(x) for g, x in zip(active, inputs, strict=True)]), ROUND_TIMEOUT
        )
        stepped = []
        for generation, output in zip(active, outputs, strict=True):
            if isinstance(output, BaseException):
                logger.warning("a request failed: %s", output)
                generation.fail(output)
            else:
                stepped.append((generation, output))
        if not stepped:
            return
        # the last position fed and every draft's
        widths = [generation.speculation.drafts.shape[1] + 1 for generation, _ in stepped]
        last = torch.cat(
            [output[0, -width:] for (_, output), width in zip(stepped, widths, strict=True)]
        )
        logits = head.logits(last.to(head.lm_head.weight.dtype)).split(widths)
        now = time.perf_counter()
        for (generation, _), rows in zip(stepped, logits, strict=True):
            if generation.job.cancelled.is_set():
                continue
            first = generation.generated == 0
            taken = generation.accept_round(rows[None], generation.job.settings.eos_token_ids)
            self.metrics.completion_tokens.inc(taken)
            if first:
                self.metrics.time_to_first_token.observe(now - generation.job.submitted)
            if generation.done:
                self.last_route = _route_report(generation.session)
        for generation, _ in stepped:
            for stream in generation.session.hops:
                if stream.last_timing is not None:
                    self.metrics.peer_batch.observe(stream.last_timing.batch)

    def _decode(self, tokens: list[int]) -> str:
        return self.model.tokenizer.decode(tokens, skip_special_tokens=True)


def _route_report(session: InferenceSession) -> list[HopReport]:
    report = []
    for stream in session.hops:
        timing = stream.last_timing
        report.append(
            HopReport(
                stream.hop.peer_id,
                stream.hop.start,
                stream.hop.end,
                timing.batch if timing else 1,
                round(timing.compute * 1e3, 2) if timing else 0.0,
                round(timing.round_trip * 1e3, 2) if timing else 0.0,
            )
        )
    return report


async def _settle(steps: list[Any]) -> list[Any]:
    """Every step's result or exception; one request's failure leaves the others running."""
    return await asyncio.gather(*steps, return_exceptions=True)


def _log_close_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("closing a session failed: %s", future.exception())
