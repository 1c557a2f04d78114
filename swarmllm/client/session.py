"""An inference session across a chain of peers, with failover that replays history.

The client keeps, for every hop, the inputs it has sent (positions 0..n), committed only when a
step has run through the whole chain. When a hop fails through its own fault the client bans the
peer (a peer that is busy, or refuses the client's own bad request, is only avoided for the
session), routes only that hop's blocks again (possibly across several peers), replays the
stored inputs to rebuild their caches (in chunks within each peer's limits), and retries the
step where it failed. Replay restarts from position 0, so the replacement's cache matches the
failed peer's exactly.

Finding a working replacement is bounded by time, not by a count of attempts: every attempt
skips each peer that failed an earlier attempt of the same search, so peers that announce
much and serve nothing (anyone can mint as many as they like) cost one attempt each and cannot
use up the budget before an honest peer is tried. Blocks that no live peer serves any more
(their only peers left) are waited for within the same budget: another peer may move there. What
the client sees of each peer feeds the router's ``reputation``.

A spot-check (``verification``) that outvotes a hop fails it over like any fault, and the
peer is trusted for nothing it computed: its earlier outputs, even those within the tolerance
(a skipped block barely moves the first token's huge-norm state, yet that shifts every later
token), went into the next hops' caches and the tokens sampled since. Unless the lie came in
the session's first step, the session rewinds to the start and raises ``SessionRewound`` so
that the generation makes those tokens again. ``audit`` checks every hop's whole history once
more, surely, when a generation ends: a lie in its last steps would otherwise escape the
random checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec
from swarmllm.client.profile import Profile, phase_of
from swarmllm.client.router import Router
from swarmllm.client.routing import FAILED_JUST_NOW, Hop, NoRouteError
from swarmllm.client.verification import OutvotedHop, SpotChecker, VerificationEvidence
from swarmllm.protocol import ErrorCode

logger = logging.getLogger("swarmllm.client")


# Seconds one search for working peers for a range may take (every attempt's own timeouts are
# shorter; a stream that does not open fails in ``SessionSpec.open_timeout``).
FAILOVER_TIMEOUT = 60.0
HEDGE_AFTER = 0.5  # seconds an opening may take before the next best route opens beside it
COVERAGE_POLL = 2.0  # seconds between reads of the map while blocks wait for a peer
MAX_OPENING = 16  # routes opening at once in one search


class SessionFailedError(RuntimeError):
    """A step could not complete within the failover budget."""


class SessionRewound(RuntimeError):
    """A hop was caught lying after its outputs went on: the session has replaced it and
    forgotten every token from ``position`` on; the caller makes them again."""

    def __init__(self, position: int, reason: str):
        super().__init__(f"rewound to position {position}: {reason}")
        self.position = position


class InferenceSession:
    def __init__(
        self,
        router: Router,
        spec: SessionSpec,
        *,
        failover_timeout: float = FAILOVER_TIMEOUT,
        profile: Profile | None = None,
        verifier: SpotChecker | None = None,
        adapter: str | None = None,
    ):
        self.router, self.spec, self.failover_timeout = router, spec, failover_timeout
        self.profile = profile
        self.verifier = verifier  # spot-checks hops; a hop it outvotes fails over like any fault
        self.hops: list[HopStream] = []
        self.history: list[list[torch.Tensor]] = []  # per hop: the inputs sent, in order
        # per hop: the outputs it returned for them (a spot-check compares all of them)
        self.outputs: list[list[torch.Tensor]] = []
        # image prompts: the adapter the first hop must serve, and the images it was sent
        self.adapter = adapter
        self.images: ImageInputs | None = None
        self.position = 0
        self.failovers = 0  # hops replaced after a failure
        self._busy: set[str] = set()

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    @property
    def evidence(self) -> list[VerificationEvidence]:
        """Every spot-check of this session that found disagreeing signed outputs."""
        return self.verifier.evidence if self.verifier is not None else []

    async def open(self) -> None:
        self.hops, self.history, self.outputs = await self._connect(
            0, self.router.num_blocks, history=None
        )

    async def step(
        self,
        hidden: torch.Tensor,
        position: int | None = None,
        images: ImageInputs | None = None,
        phase: str | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through every hop, starting at ``position``
        (default: right after the previous step; an earlier position rewinds). ``images``
        (absolute positions, in the wire dtype) go to the first hop's adapter. ``phase``
        names the step in the profile (default: by its number of tokens)."""
        position = self.position if position is None else position
        if images is not None and self.adapter is None:
            raise ValueError("images need a session opened with the adapter of the image encoder")
        if position > self.position:
            raise ValueError(f"position {position} skips past the session's {self.position} tokens")
        if position + hidden.shape[1] > self.spec.max_length:
            raise ValueError(
                f"{position + hidden.shape[1]} tokens exceed the session's max length "
                f"{self.spec.max_length}"
            )
        if position < self.position:
            self.rewind(position)
        # the inputs each hop accepted in this step: committed to the history only once the
        # whole chain has run it, so a step that fails half-way leaves no hop's history (and
        # no later replay) holding its tokens; the peers' caches are rewound by the next step
        accepted: list[torch.Tensor] = []
        produced: list[torch.Tensor] = []
        index = 0
        while index < len(self.hops):
            first_hop_images = images if index == 0 else None
            # a stateless re-run can't carry the images: the first hop of an image prompt is
            # not spot-checked
            holds_images = index == 0 and (images is not None or self.images is not None)
            try:
                output = await self.hops[index].step(hidden, position, first_hop_images)
                if self.verifier is not None and not holds_images:
                    stream = self.hops[index]
                    await self.verifier.check(
                        stream, self.history[index], self.outputs[index], hidden, output, position
                    )
            except HopFailure as failure:
                self._penalise(failure)
                await self._fail_over(index)
                if isinstance(failure, OutvotedHop) and position > 0:
                    self._rewind_past_liar(failure)
                continue  # retry this step on the replacement
            self._observe(self.hops[index], hidden.shape[1], phase)
            accepted.append(hidden)
            produced.append(output)
            hidden = output
            index += 1
        for chunks, sent in zip(self.history, accepted, strict=True):
            chunks.append(sent)
        for chunks, returned in zip(self.outputs, produced, strict=True):
            chunks.append(returned)
        if images is not None:
            self.images = _merged(self.images, images)
        self.position = position + hidden.shape[1]
        return hidden

    async def audit(self) -> None:
        """Spot-check every hop's whole history now (a no-op without a verifier); raise
        SessionRewound when one is outvoted (it is replaced)."""
        if self.verifier is None:
            return
        for index in range(len(self.hops)):
            history, outputs = self.history[index], self.outputs[index]
            if not history or (index == 0 and self.images is not None):
                continue  # nothing sent yet, or images (a stateless re-run can't carry them)
            stream = self.hops[index]
            last = self.position - history[-1].shape[1]
            try:
                await self.verifier.check(
                    stream, history[:-1], outputs[:-1], history[-1], outputs[-1], last, always=True
                )
            except OutvotedHop as failure:
                self._penalise(failure)
                await self._fail_over(index)
                self._rewind_past_liar(failure)

    def _rewind_past_liar(self, failure: OutvotedHop) -> None:
        """Forget every token (the liar had a hand in all of them) and raise SessionRewound."""
        if self.images is not None:  # sent once, with their prompt: the caller no longer has them
            raise SessionFailedError(
                f"{failure}; the session holds images, so its tokens cannot be made again here: "
                "start the generation again"
            ) from failure
        self.rewind(0)
        raise SessionRewound(0, str(failure)) from failure

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.hops))
        self.hops, self.history, self.outputs = [], [], []

    def _observe(self, stream: HopStream, tokens: int, phase: str | None) -> None:
        """Profile the step of ``stream`` just done (in ``phase``, default by its length);
        time it when it decoded one token."""
        timing = stream.last_timing
        if timing is None:
            return
        if self.profile is not None:
            self.profile.add_hop(stream.hop, phase or phase_of(tokens), timing)
        if tokens == 1:
            peer_id, blocks = stream.hop.peer_id, stream.hop.end - stream.hop.start
            rtt = self.router.connection.rtt.get(peer_id)
            self.router.reputation.timed(peer_id, blocks, timing.round_trip, rtt)

    def _penalise(self, failure: HopFailure, connecting: bool = False) -> None:
        """Ban a peer at fault; avoid one that refused for this session. ``connecting``: the
        failure came while opening streams and replaying, when no session can have expired."""
        logger.warning("hop failed: %s", failure)
        peer_id = failure.hop.peer_id
        if not failure.fault and failure.code == ErrorCode.EXPIRED and not connecting:
            return  # a session the client let idle is simply opened again
        self.router.reputation.failed(peer_id, refused=not failure.fault)
        if failure.fault:
            self.router.bans.ban(peer_id, failure.reason)
        else:
            self._busy.add(peer_id)

    async def _fail_over(self, index: int) -> None:
        """Replace hop ``index`` by a fresh route over its blocks (maybe several peers) whose
        caches are rebuilt from the failed hop's history."""
        failed = self.hops[index]
        self.failovers += 1
        await failed.close()
        history = torch.cat(self.history[index], dim=1) if self.history[index] else None
        images = self.images if index == 0 else None
        streams, histories, outputs = await self._connect(
            failed.hop.start, failed.hop.end, history, images
        )
        self.hops[index : index + 1] = streams
        self.history[index : index + 1] = histories
        self.outputs[index : index + 1] = outputs

    async def _connect(
        self,
        start: int,
        end: int,
        history: torch.Tensor | None,
        images: ImageInputs | None = None,
    ) -> tuple[list[HopStream], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Open streams over a route for ``[start, end)`` and replay ``history`` (with the
        first hop's ``images``) through them, retrying on failures within the failover budget,
        each attempt without the peers that failed the earlier ones. Returns the streams, the
        inputs each has seen and the outputs it returned for them; raises NoRouteError once no
        untried peer is left."""
        search = _Search(time.monotonic() + self.failover_timeout)
        while True:
            streams = await self._open_route(start, end, search)
            histories: list[list[torch.Tensor]] = [[] for _ in streams]
            outputs: list[list[torch.Tensor]] = [[] for _ in streams]
            try:
                if history is not None:
                    route = [stream.hop for stream in streams]
                    logger.info("replaying %d tokens on %s", history.shape[1], route)
                    replay, hop_images = history, images
                    for stream, seen, returned in zip(streams, histories, outputs, strict=True):
                        seen.append(replay)
                        replay = await stream.step(replay, 0, hop_images)
                        returned.append(replay)
                        hop_images = None  # only the first of them holds block 0
            except HopFailure as failure:
                await asyncio.gather(*(s.close() for s in streams))
                self._failed(failure, search, start, end)
                continue
            for stream in streams:
                self.router.reputation.opened(stream.hop.peer_id)
            return streams, histories, outputs

    async def _open_route(self, start: int, end: int, search: _Search) -> list[HopStream]:
        """The streams of the first route that opens. Routes open one after another: whenever
        the latest has not opened within ``HEDGE_AFTER`` seconds, the next best (without the
        peers still opening) opens beside it, so a peer that never answers delays the search
        by that much rather than by its whole open timeout. The routes still opening when one
        wins are closed; a peer still opening a route that started before the winner (it lost
        the race to a later one) is cooled down as if it had refused."""
        opening: dict[asyncio.Future, tuple[float, list[HopStream]]] = {}
        exhausted = False  # no route avoids the peers still opening
        try:
            while True:
                if not exhausted and len(opening) < MAX_OPENING:
                    busy = {s.hop.peer_id for _, streams in opening.values() for s in streams}
                    try:
                        route = await self.router.route(
                            start,
                            end,
                            min_cache_tokens=self.spec.max_length * self.spec.batch,
                            avoid=_avoided(search.failed, self._busy | busy),
                            first_hop_adapter=self.adapter if start == 0 else None,
                            fresh=search.fresh_read(),
                        )
                    except NoRouteError as error:
                        if opening:
                            exhausted = True
                        else:
                            await self._wait_for_coverage(error, search)
                            continue
                    else:
                        connection = self.router.connection
                        streams = [HopStream(connection, hop, self.spec) for hop in route]
                        task = asyncio.ensure_future(_open_all(streams))
                        opening[task] = (time.monotonic(), streams)
                hedge = None if exhausted or len(opening) >= MAX_OPENING else HEDGE_AFTER
                done, _ = await asyncio.wait(
                    opening, timeout=hedge, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    started, streams = opening.pop(task)
                    if (error := task.exception()) is None:
                        self._cool_down_laggards(opening.values(), started)
                        return streams
                    await asyncio.gather(*(s.close() for s in streams))
                    if not isinstance(error, HopFailure):
                        raise error
                    exhausted = False  # the failed route's other peers are free again
                    self._failed(error, search, start, end)
        finally:
            for task in opening:
                task.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            laggards = [s for _, streams in opening.values() for s in streams]
            await asyncio.gather(*(s.close() for s in laggards))

    async def _wait_for_coverage(self, error: NoRouteError, search: _Search) -> None:
        """Wait a moment for the swarm to re-cover blocks that no live peer serves (a peer
        that left is replaced by another moving there); re-raise ``error`` when waiting cannot
        help (the client's own filters exclude the peers) or the search's time is up."""
        left = search.deadline - time.monotonic()
        if not error.transient or left <= 0:
            if search.waited:
                raise NoRouteError(
                    f"{error}; no peer came to serve them within {self.failover_timeout:.0f} s",
                    error.uncovered,
                    error.missing_adapter,
                ) from error
            raise error
        if not search.waited:
            logger.warning("%s: waiting up to %.0f s for a peer to serve them", error, left)
        search.waited = True
        await asyncio.sleep(min(COVERAGE_POLL, left))
        search.read_fresh_next()

    def _failed(self, failure: HopFailure, search: _Search, start: int, end: int) -> None:
        """Count a failed attempt of the search; raise once its time is up."""
        self._penalise(failure, connecting=True)
        search.failed[failure.hop.peer_id] = failure.reason
        if time.monotonic() > search.deadline:
            raise SessionFailedError(
                f"blocks {start}-{end - 1}: no working peer within "
                f"{self.failover_timeout:.0f} s ({len(search.failed)} peers failed; the last: "
                f"{failure})"
            ) from failure

    def _cool_down_laggards(
        self, opening: Iterable[tuple[float, list[HopStream]]], winner_started: float
    ) -> None:
        """Cool down the peers of routes that began opening before the winner did and have
        not opened yet."""
        now = time.monotonic()
        for started, streams in opening:
            if started < winner_started:
                for stream in streams:
                    if stream.limits is None:  # this stream had not opened
                        logger.warning(
                            "peer %s did not open a stream in %.1f s; another route won",
                            stream.hop.peer_id,
                            now - started,
                        )
                        self.router.reputation.failed(stream.hop.peer_id, refused=True)

    def rewind(self, position: int) -> None:
        """Forget every token from ``position`` on (rejected drafts): the history a failover
        replays loses them now, the peers' caches at the next step (sent at ``position``)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a session of {self.position} tokens to {position}")
        if self.images is not None:  # raises, before any change, inside an image
            self.images = self.images.before(position)
        self.history = [_before(chunks, position) for chunks in self.history]
        self.outputs = [_before(chunks, position) for chunks in self.outputs]
        self.position = position


@dataclass
class _Search:
    """One search for working peers for a range: its deadline and the peers that failed it."""

    deadline: float
    failed: dict[str, str] = field(default_factory=dict)  # peer -> why its attempt failed
    waited: bool = False  # for uncovered blocks to be served again
    _read_fresh: bool = False  # the map was read anew after the first failure
    _fresh_next: bool = False

    def fresh_read(self) -> bool:
        """Whether the next route reads the map anew: once after the first failure (the map
        may be stale; reads cost every DHT node), and after each wait for coverage."""
        if self._fresh_next or (self.failed and not self._read_fresh):
            self._read_fresh, self._fresh_next = True, False
            return True
        return False

    def read_fresh_next(self) -> None:
        self._fresh_next = True


def _avoided(failed: Mapping[str, str], busy: set[str]) -> dict[str, str]:
    """Peers a search skips, with why: failed in this search, or busy for this session."""
    return {**dict.fromkeys(failed, FAILED_JUST_NOW), **dict.fromkeys(busy, "busy")}


async def _open_all(streams: list[HopStream]) -> None:
    """Open every stream concurrently; raise the first failure."""
    results = await asyncio.gather(*(s.open() for s in streams), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _before(chunks: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """The tokens of ``chunks`` (one per step, along dim 1) before ``position``: the chunks
    before it as they are and the one it cuts sliced (views, no copy: speculative decoding
    rewinds every round)."""
    kept: list[torch.Tensor] = []
    length = 0
    for chunk in chunks:
        if length >= position:
            break
        kept.append(chunk[:, : position - length])
        length += chunk.shape[1]
    return kept


def _merged(earlier: ImageInputs | None, later: ImageInputs) -> ImageInputs:
    if earlier is None:
        return later
    return ImageInputs(
        torch.cat([earlier.features, later.features]),
        torch.cat([earlier.positions, later.positions]),
    )
