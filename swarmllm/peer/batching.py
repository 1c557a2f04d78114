"""Decode steps of different sessions that reach a peer together run as one batched forward.

Every forward pass of the peer goes through one queue served by the single compute thread.
A single-token step of a session (a decode step) waits in the queue with the others; when the
compute thread takes one, it takes every queued decode step of the same span with it, and
runs them as one batch (``BlockSpan.decode_batch``), each session with its own cache. Anything
else (a prompt, a replay, a stateless forward) runs alone. Inference steps go first: a stateless
forward (a spot-check, or anyone's bulk job) runs only when no inference step is queued, or once
it has waited ``FORWARD_MAX_WAIT`` seconds. Every job taken from the queue gets its result or an
error, whatever fails.

While a session that ran its prompt or sent a decode step for that span in the last
``active_period`` seconds is missing from the batch, the batch waits for it, at most ``window``
seconds: a lone session never waits, sessions stepping in lockstep are batched whole instead of
one plus the rest (from their first decode step on), and a session that closes (its cache is
freed) or goes idle stops holding the others up. A session that was served while the batch's
first step already waited is not waited for: it is a step ahead, and a client that steps its
sessions together (ours and the API server do) sends its next step only once this one is
answered, so waiting for it would only stall both for the whole window. By default
the window is as long as the span's last decode pass (waiting longer for a straggler would cost
more than running it in a pass of its own), but at least ``MIN_AUTO_WINDOW``: steps sent together
reach the queue that far apart after their off-loop decoding, so a span faster than that would
otherwise never batch.

Decode passes run on ``decode_threads`` torch threads (default 1), other passes on
``num_threads``: a single-token pass is a chain of small ops where a second thread mostly adds
synchronisation, and peers sharing a machine then keep out of each other's way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch

from swarmllm.blocks.kv_cache import KVCache
from swarmllm.blocks.span import BlockSpan
from swarmllm.peer.compute import ComputeWorker

logger = logging.getLogger("swarmllm.peer")

T = TypeVar("T")

MAX_AUTO_WINDOW = 0.05  # seconds: the default window is the last decode pass, at most this
MIN_AUTO_WINDOW = 0.01  # ... and at least this
ACTIVE_PERIOD = 1.0  # a session that sent a decode step this recently is expected again
MAX_BATCH_ROWS = 64
# A batched pass lines every row's keys up to the longest session's (right padding): its
# attention holds rows x longest tokens per layer, whatever the sessions' own lengths.
MAX_BATCH_TOKENS = 32768
FORWARD_MAX_WAIT = 2.0  # seconds a stateless forward may be overtaken by inference steps


@dataclass
class _Activity:
    """When a session's cache last came to a span for its prompt or a decode step, and when
    its last pass there finished (``time.perf_counter`` seconds)."""

    span: BlockSpan
    seen: float
    served: float = float("-inf")


class Computed(NamedTuple):
    output: torch.Tensor
    seconds: float  # wall time of the forward pass that produced it (shared by its batch)
    queued: float  # seconds the step waited before that pass started
    batch: int  # sessions in that forward pass


@dataclass(eq=False)
class _Job:
    span: BlockSpan
    hidden: torch.Tensor
    cache: KVCache | None
    pad_lengths: torch.Tensor | None
    future: asyncio.Future[Computed]
    submitted: float = field(default_factory=time.perf_counter)
    # a prompt (or replay) fills an empty cache: its session decodes here next
    fills_cache: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fills_cache = self.cache is not None and self.cache.length == 0

    @property
    def batchable(self) -> bool:
        return self.cache is not None and self.hidden.shape[1] == 1


class BatchingWorker(ComputeWorker):
    """The peer's compute worker: ``forward`` batches concurrent decode steps."""

    def __init__(
        self,
        num_threads: int | None = None,
        *,
        decode_threads: int = 1,
        window: float | None = None,
        active_period: float = ACTIVE_PERIOD,
        max_rows: int = MAX_BATCH_ROWS,
        max_tokens: int = MAX_BATCH_TOKENS,
    ):
        super().__init__(num_threads)
        self.threads = num_threads or torch.get_num_threads()
        self.decode_threads = decode_threads
        self.window, self.active_period, self.max_rows = window, active_period, max_rows
        self.max_tokens = max_tokens  # rows x longest cache of one batched pass
        self._last_pass: dict[BlockSpan, float] = {}  # seconds of each span's last decode pass
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        # each session's last prompt or decode step; a closed session drops out as soon as
        # its cache is garbage
        self._activity: weakref.WeakKeyDictionary[KVCache, _Activity] = weakref.WeakKeyDictionary()

    async def forward(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        cache: KVCache | None,
        pad_lengths: torch.Tensor | None,
    ) -> Computed:
        """``span(hidden, cache, pad_lengths)`` on the compute thread, batched when possible."""
        job = _Job(span, hidden, cache, pad_lengths, asyncio.get_running_loop().create_future())
        if job.batchable:
            self._note(cache, span, seen=job.submitted)
        self._queue.append(job)
        self._arrived.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        return await job.future

    async def _dispatch(self) -> None:
        while self._queue:
            job = self._next()
            if job.future.done():  # its request was cancelled while it waited
                continue
            taken = [job]
            try:
                if job.batchable:
                    taken = await self._gather(job)
                    await self._run_batch(taken)
                else:
                    await self._run_alone(job)
            except BaseException as e:  # a bug here must not leave a request waiting forever
                logger.exception("the batching dispatcher failed", exc_info=e)
                error = e if isinstance(e, Exception) else RuntimeError("the peer is stopping")
                for waiting in taken:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                if not isinstance(e, Exception):
                    raise

    def _note(
        self,
        cache: KVCache,
        span: BlockSpan,
        seen: float | None = None,
        served: float | None = None,
    ) -> None:
        """Record when the session of ``cache`` came to ``span`` or was served there."""
        activity = self._activity.get(cache)
        if activity is None:
            activity = self._activity[cache] = _Activity(span, seen=float("-inf"))
        if seen is not None:
            activity.seen = seen
        if served is not None:
            activity.served = served

    def _next(self) -> _Job:
        """The oldest inference step, unless a stateless forward has waited too long."""
        oldest = self._queue[0]
        if oldest.cache is None and time.perf_counter() - oldest.submitted < FORWARD_MAX_WAIT:
            for index, job in enumerate(self._queue):
                if job.cache is not None:
                    del self._queue[index]
                    return job
        return self._queue.popleft()

    async def _gather(self, first: _Job) -> list[_Job]:
        """``first`` and the queued decode steps of its span, after waiting (at most
        ``window``) for the sessions that are decoding there but not yet queued."""
        window = self.window
        if window is None:
            last_pass = self._last_pass.get(first.span, 0.0)
            window = min(MAX_AUTO_WINDOW, max(MIN_AUTO_WINDOW, last_pass))
        deadline = time.perf_counter() + window
        while True:
            batch, rows = [first], first.hidden.shape[0]
            longest = first.cache.length + 1
            for job in self._queue:
                if job.span is first.span and job.batchable and not job.future.done():
                    more, length = job.hidden.shape[0], max(longest, job.cache.length + 1)
                    if rows + more > self.max_rows or (rows + more) * length > self.max_tokens:
                        continue  # runs in a later pass
                    batch.append(job)
                    rows, longest = rows + more, length
            now = time.perf_counter()
            # when each active session missing from the batch (and not a step ahead of it)
            # stops counting as active
            missing = [
                activity.seen + self.active_period
                for cache, activity in list(self._activity.items())
                if activity.span is first.span
                and now < activity.seen + self.active_period
                and activity.served < first.submitted
                and all(job.cache is not cache for job in batch)
            ]
            if not missing or rows >= self.max_rows or now >= deadline:
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(deadline, *missing) - now)
        taken = set(map(id, batch))
        self._queue = deque(job for job in self._queue if id(job) not in taken)
        return batch

    async def _run_batch(self, batch: list[_Job]) -> None:
        if len(batch) == 1:
            await self._run_alone(batch[0])
            return
        span = batch[0].span
        try:
            outputs, started, seconds = await self.run(
                _timed,
                self.decode_threads,
                span.decode_batch,
                [job.hidden for job in batch],
                [job.cache for job in batch],
                [job.pad_lengths for job in batch],
            )
        except Exception as e:
            # caches only advance after a whole pass, so each step can be rerun alone: a
            # request that breaks the batch then fails by itself, not its neighbours
            logger.warning(
                "a batch of %d decode steps failed (%s); running them alone", len(batch), e
            )
            for job in batch:
                await self._run_alone(job)
            return
        self._last_pass[span] = seconds
        for job, output in zip(batch, outputs, strict=True):
            self._note(job.cache, span, served=started + seconds)
            if not job.future.done():
                job.future.set_result(
                    Computed(output, seconds, started - job.submitted, len(batch))
                )

    async def _run_alone(self, job: _Job) -> None:
        try:
            threads = self.decode_threads if job.hidden.shape[1] == 1 else self.threads
            output, started, seconds = await self.run(
                _timed, threads, job.span.forward, job.hidden, job.cache, job.pad_lengths
            )
        except Exception as e:
            if not job.future.done():
                job.future.set_exception(e)
            return
        if not job.future.done():
            job.future.set_result(Computed(output, seconds, started - job.submitted, 1))
        finished = started + seconds
        if job.batchable:
            self._last_pass[job.span] = seconds
            self._note(job.cache, job.span, served=finished)
        elif job.fills_cache:
            self._note(job.cache, job.span, seen=finished, served=finished)


def _timed(threads: int, fn: Callable[..., T], *args) -> tuple[T, float, float]:
    """``fn(*args)`` on ``threads`` torch threads, when it started and how long it took
    (measured on the compute thread)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    result = fn(*args)
    return result, started, time.perf_counter() - started
