"""The client's router: routes over the live coverage map, skipping banned and busy peers.

``routing.find_route`` is the pure choice of a chain; this module feeds it a coverage map read
from the DHT (reused for a while), the RTTs the connection has measured and what the client has
seen of each peer (``reputation``): measured step times, risk premiums for unproven peers, and
peers that refused lately, used only when no route avoids them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping

from swarmllm.client.bans import UNREACHABLE, BanList
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.reputation import Reputation
from swarmllm.client.routing import (
    MIN_BLOCK_SECONDS,
    Hop,
    NoRouteError,
    check_precision,
    find_route,
)
from swarmllm.dht.records import CoverageMap

# Seconds a coverage map serves new routes. A read is a DHT lookup of every block's key: tens
# of ms, and CPU on every DHT node that answers. A route through a peer that has left since
# fails and reads the map again, so it need not be fresher (Petals refreshes every 60 s).
COVERAGE_MAX_AGE = 30.0


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
        min_precision: str | None = None,
        min_block_seconds: float = MIN_BLOCK_SECONDS,
    ):
        """``min_block_seconds``: the least time a block of this model can take for one token
        (``reputation.plausible_block_seconds``); announced throughputs are read as no faster."""
        check_precision(min_precision)
        self.connection, self.model_id, self.num_blocks = connection, model_id, num_blocks
        self.bans, self.allowed, self.max_age = bans, allowed, max_age
        self.min_precision = min_precision  # route (and spot-check) only through peers this fine
        self.min_block_seconds = min_block_seconds
        self.reputation = Reputation()
        self._coverage: tuple[float, CoverageMap] | None = None  # (read at, map)
        self._reading = asyncio.Lock()

    async def route(
        self,
        start: int,
        end: int,
        *,
        min_cache_tokens: int,
        avoid: Collection[str] | Mapping[str, str] = (),
        first_hop_adapter: str | None = None,
        fresh: bool = False,
    ) -> list[Hop]:
        """A route over ``[start, end)`` skipping banned peers and ``avoid`` (peers, or a map
        of them to why: the reason NoRouteError names; ``busy`` for a plain collection)."""
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
        avoid: Collection[str] | Mapping[str, str],
        first_hop_adapter: str | None,
    ) -> list[Hop]:
        # only ONLINE peers: one still JOINING may not answer yet, and must not be banned
        online = {peer for block in range(coverage.num_blocks) for peer in coverage.online(block)}
        unmeasured = sorted(online - set(self.connection.rtt))
        if unmeasured:
            await self.connection.ping_all(unmeasured)
            for peer_id in unmeasured:  # a record can outlive its peer until it expires
                if peer_id not in self.connection.rtt:
                    self.bans.ban(peer_id, UNREACHABLE)
        avoided = dict(avoid) if isinstance(avoid, Mapping) else dict.fromkeys(avoid, "busy")
        excluded = {**avoided, **self.bans.rejections()}

        def route(skipped: dict[str, str]) -> list[Hop]:
            return find_route(
                coverage,
                start=start,
                end=end,
                rtt=self.connection.rtt,
                banned=skipped,
                allowed=self.allowed,
                min_cache_tokens=min_cache_tokens,
                first_hop_adapter=first_hop_adapter,
                min_precision=self.min_precision,
                measured=self.reputation.measured(),
                min_block_seconds=self.min_block_seconds,
                premiums=self.reputation.risk_premiums(coverage.peers(), min_cache_tokens),
            )

        cooling = self.reputation.cooling()
        if cooling:
            try:  # peers that refused lately only when nothing else covers their blocks
                return route({**cooling, **excluded})
            except NoRouteError:
                pass
        return route(excluded)
