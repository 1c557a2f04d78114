"""An inference session across a chain of peers, with failover that replays history.

The client keeps, for every hop, the inputs it has sent (positions 0..n). When a hop fails it
bans the peer, routes only that hop's blocks again (possibly across several peers), replays the
stored inputs to rebuild their caches, and retries the step where it failed. Replay restarts
from position 0, so the replacement's cache matches the failed peer's exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

import torch

from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.bans import BanList
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec
from swarmllm.client.profile import Profile, phase_of
from swarmllm.client.routing import Hop, NoRouteError, find_route
from swarmllm.client.verification import SpotChecker, VerificationEvidence
from swarmllm.dht.records import CoverageMap

logger = logging.getLogger("swarmllm.client")

# Seconds a coverage map serves new routes. A read is a DHT lookup of every block's key: tens
# of ms, and CPU on every DHT node that answers. A route through a peer that has left since
# fails and reads the map again, so it need not be fresher (Petals refreshes every 60 s).
COVERAGE_MAX_AGE = 30.0


class SessionFailedError(RuntimeError):
    """A step could not complete within the failover budget."""


class Router:
    """Finds routes over the live coverage map, avoiding banned and busy peers.

    A coverage map read less than ``max_age`` seconds ago serves new routes (sessions
    opened together share one DHT read, and opening a session skips it); a route that fails
    on it, and every retry (``fresh``), reads the map again.
    """

    def __init__(
        self,
        connection: SwarmConnection,
        model_id: str,
        num_blocks: int,
        bans: BanList,
        allowed: Collection[str] | None = None,
        max_age: float = COVERAGE_MAX_AGE,
    ):
        self.connection, self.model_id, self.num_blocks = connection, model_id, num_blocks
        self.bans, self.allowed, self.max_age = bans, allowed, max_age
        self._coverage: tuple[float, CoverageMap] | None = None  # (read at, map)
        self._reading = asyncio.Lock()

    async def route(
        self,
        start: int,
        end: int,
        *,
        min_cache_tokens: int,
        avoid: Collection[str] = (),
        first_hop_adapter: str | None = None,
        fresh: bool = False,
    ) -> list[Hop]:
        coverage, was_cached = await self.read_coverage(fresh)
        try:
            return await self._route_over(
                coverage, start, end, min_cache_tokens, avoid, first_hop_adapter
            )
        except NoRouteError:
            if not was_cached:
                raise
        coverage, _ = await self.read_coverage(fresh=True)
        return await self._route_over(
            coverage, start, end, min_cache_tokens, avoid, first_hop_adapter
        )

    async def read_coverage(self, fresh: bool) -> tuple[CoverageMap, bool]:
        """The coverage map, and whether it is a recent read reused rather than a new one."""
        async with self._reading:
            if (
                not fresh
                and self._coverage is not None
                and time.monotonic() - self._coverage[0] < self.max_age
            ):
                return self._coverage[1], True
            loop = asyncio.get_running_loop()
            coverage = await loop.run_in_executor(
                None, self.connection.coverage, self.model_id, self.num_blocks
            )
            self._coverage = (time.monotonic(), coverage)
            return coverage, False

    async def _route_over(
        self,
        coverage: CoverageMap,
        start: int,
        end: int,
        min_cache_tokens: int,
        avoid: Collection[str],
        first_hop_adapter: str | None,
    ) -> list[Hop]:
        unmeasured = [p for p in coverage.peers() if p not in self.connection.rtt]
        if unmeasured:
            await self.connection.ping_all(unmeasured)
            for peer_id in unmeasured:  # a record can outlive its peer until it expires
                if peer_id not in self.connection.rtt:
                    self.bans.ban(peer_id, "did not answer a ping")
        return find_route(
            coverage,
            start=start,
            end=end,
            rtt=self.connection.rtt,
            banned=self.bans.banned() | set(avoid),
            allowed=self.allowed,
            min_cache_tokens=min_cache_tokens,
            first_hop_adapter=first_hop_adapter,
        )


class InferenceSession:
    def __init__(
        self,
        router: Router,
        spec: SessionSpec,
        *,
        max_failovers: int = 8,
        profile: Profile | None = None,
        verifier: SpotChecker | None = None,
        adapter: str | None = None,
    ):
        self.router, self.spec, self.max_failovers = router, spec, max_failovers
        self.profile = profile
        self.verifier = verifier  # spot-checks hops; a hop it outvotes fails over like any fault
        self.hops: list[HopStream] = []
        self.history: list[list[torch.Tensor]] = []  # per hop: the inputs sent, in order
        # image prompts: the adapter the first hop must serve, and the images it was sent
        self.adapter = adapter
        self.images: ImageInputs | None = None
        self.position = 0
        self._busy: set[str] = set()

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    @property
    def evidence(self) -> list[VerificationEvidence]:
        """Every spot-check of this session that found disagreeing signed outputs."""
        return self.verifier.evidence if self.verifier is not None else []

    async def open(self) -> None:
        self.hops, self.history = await self._connect(0, self.router.num_blocks, history=None)

    async def step(
        self,
        hidden: torch.Tensor,
        position: int | None = None,
        images: ImageInputs | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through every hop, starting at ``position``
        (default: right after the previous step; an earlier position rewinds). ``images``
        (absolute positions, in the wire dtype) go to the first hop's adapter."""
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
            self._rewind(position)
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
                    await self.verifier.check(stream, self.history[index], hidden, output, position)
            except HopFailure as failure:
                self._penalise(failure)
                await self._fail_over(index)
                continue  # retry this step on the replacement
            if self.profile is not None and self.hops[index].last_timing is not None:
                phase = phase_of(hidden.shape[1])
                self.profile.add_hop(self.hops[index].hop, phase, self.hops[index].last_timing)
            self.history[index].append(hidden)
            if first_hop_images is not None:
                self.images = _merged(self.images, first_hop_images)
            hidden = output
            index += 1
        self.position = position + hidden.shape[1]
        return hidden

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.hops))
        self.hops, self.history = [], []

    def _penalise(self, failure: HopFailure) -> None:
        logger.warning("hop failed: %s", failure)
        if failure.fault:
            self.router.bans.ban(failure.hop.peer_id, failure.reason)
        else:
            self._busy.add(failure.hop.peer_id)

    async def _fail_over(self, index: int) -> None:
        """Replace hop ``index`` by a fresh route over its blocks (maybe several peers) whose
        caches are rebuilt from the failed hop's history."""
        failed = self.hops[index]
        await failed.close()
        history = torch.cat(self.history[index], dim=1) if self.history[index] else None
        images = self.images if index == 0 else None
        streams, histories = await self._connect(failed.hop.start, failed.hop.end, history, images)
        self.hops[index : index + 1] = streams
        self.history[index : index + 1] = histories

    async def _connect(
        self,
        start: int,
        end: int,
        history: torch.Tensor | None,
        images: ImageInputs | None = None,
    ) -> tuple[list[HopStream], list[list[torch.Tensor]]]:
        """Open streams over a route for ``[start, end)`` and replay ``history`` (with the
        first hop's ``images``) through them, retrying on failures within the failover budget.
        Returns the streams and the inputs each has seen."""
        for attempt in range(self.max_failovers):
            route = await self.router.route(
                start,
                end,
                min_cache_tokens=self.spec.max_length * self.spec.batch,
                avoid=self._busy,
                first_hop_adapter=self.adapter if start == 0 else None,
                fresh=attempt > 0,
            )
            streams = [HopStream(self.router.connection, hop, self.spec) for hop in route]
            histories: list[list[torch.Tensor]] = [[] for _ in streams]
            try:
                await _open_all(streams)
                if history is not None:
                    logger.info("replaying %d tokens on %s", history.shape[1], route)
                    replay = history
                    for stream, seen in zip(streams, histories, strict=True):
                        seen.append(replay)
                        replay = await stream.step(replay, 0, images)
                        images = None  # only the first of them holds block 0
                return streams, histories
            except HopFailure as failure:
                self._penalise(failure)
                await asyncio.gather(*(s.close() for s in streams))
        raise SessionFailedError(
            f"blocks {start}-{end - 1}: no working peer after {self.max_failovers} attempts"
        )

    def _rewind(self, position: int) -> None:
        if self.images is not None:  # raises, before any change, inside an image
            self.images = self.images.before(position)
        for index, chunks in enumerate(self.history):
            if chunks:
                self.history[index] = [torch.cat(chunks, dim=1)[:, :position]]
        self.position = position


async def _open_all(streams: list[HopStream]) -> None:
    """Open every stream concurrently; raise the first failure."""
    results = await asyncio.gather(*(s.open() for s in streams), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _merged(earlier: ImageInputs | None, later: ImageInputs) -> ImageInputs:
    if earlier is None:
        return later
    return ImageInputs(
        torch.cat([earlier.features, later.features]),
        torch.cat([earlier.positions, later.positions]),
    )
