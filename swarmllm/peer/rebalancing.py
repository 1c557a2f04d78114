"""Moving a peer that chose its own blocks to where the swarm needs it (``selection.better_span``).

Every ``period`` seconds on average (uniformly 0.5 to 1.5 times that, so that peers started
together do not check together) the peer reads the live coverage map; it checks at once when a
look every ``GAP_WATCH`` seconds finds blocks that nobody serves any more. When a move pays, it
moves without leaving a block uncovered: it announces JOINING for the blocks it does not serve
yet, waits a moment, and gives way if a peer with a smaller id is joining the same blocks too or
if the move no longer pays (another peer filled the gap meanwhile); else it loads the new span,
serves it, and only then drops the old blocks (announced OFFLINE). The sessions open at the
move go on with the old layers for ``drain_timeout`` seconds; a step after that gets an EXPIRED
error, and its client opens the blocks elsewhere, blaming no one.

A move needs memory for both spans at once; a peer without that room stays where it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass

import hivemind

from swarmllm.dht.announce import Announcer
from swarmllm.dht.ping import live_coverage
from swarmllm.dht.records import CoverageMap, PeerState
from swarmllm.peer.loading import SpanLoader
from swarmllm.peer.selection import better_span, uncovered_blocks
from swarmllm.peer.servicer import PeerServicer

logger = logging.getLogger("swarmllm.peer")

RIVAL_WAIT = (1.0, 2.0)  # seconds (uniform) between announcing JOINING and checking for rivals
GAP_WATCH = 10.0  # mean seconds between looks for blocks nobody serves (one map read and ping)


@dataclass(frozen=True)
class BalanceSettings:
    period: float  # mean seconds between checks
    quality: float  # see ``better_span``
    drain_timeout: float  # seconds the sessions from before a move may go on
    fits: int  # blocks that fit in memory at once


class Rebalancer:
    def __init__(
        self,
        dht: hivemind.DHT,
        announcer: Announcer,
        servicer: PeerServicer,
        loader: SpanLoader,
        settings: BalanceSettings,
    ):
        self.dht, self.announcer, self.servicer = dht, announcer, servicer
        self.loader, self.settings = loader, settings
        self.peer_id = dht.peer_id.to_base58()
        self.moves = 0

    async def run(self) -> None:
        """Check now and then until cancelled, sooner when a block has lost all its peers; a
        check that fails is logged, not fatal."""
        while True:
            try:
                await self._wait_for_check()
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("a rebalancing check failed; serving on where we are")

    async def _wait_for_check(self) -> None:
        """Sleep a randomised ``period``, looking every ``GAP_WATCH`` seconds (or less) for
        blocks nobody serves: a swarm that lost every peer of a span re-covers it at once."""
        due = time.monotonic() + self.settings.period * random.uniform(0.5, 1.5)
        watch = min(GAP_WATCH, self.settings.period)
        while (left := due - time.monotonic()) > 0:
            await asyncio.sleep(min(left, watch * random.uniform(0.5, 1.5)))
            if left > watch and uncovered_blocks(await self._coverage()):
                return

    async def check(self) -> None:
        """Move where ``better_span`` says, if anywhere."""
        target = better_span(await self._coverage(), self.peer_id, self.settings.quality)
        if target is not None:
            await self.move(*target)

    async def move(self, start: int, end: int) -> None:
        record = self.announcer.record
        old = range(record.start, record.end)
        new = range(start, end)
        if len(set(old) | set(new)) > self.settings.fits:
            logger.info(
                "blocks [%d, %d) would serve the swarm better, but loading them beside [%d, %d) "
                "needs room for %d blocks (%d fit): staying",
                start,
                end,
                old.start,
                old.stop,
                len(set(old) | set(new)),
                self.settings.fits,
            )
            return
        joining = Announcer(
            self.dht,
            self.announcer.model_id,
            [block for block in new if block not in old],
            dataclasses.replace(record, state=PeerState.JOINING, start=start, end=end, adapters=()),
            refresh_period=self.announcer.refresh_period,
            ttl=self.announcer.ttl,
        )
        joining.start()
        handed_over = False
        try:
            await asyncio.sleep(random.uniform(*RIVAL_WAIT))
            coverage = await self._coverage()
            if rival := self._rival(coverage, start, end):
                logger.info("peer %s is joining blocks [%d, %d) too: giving way", rival, start, end)
                return
            if self._still_better(coverage) != (start, end):  # a peer filled the gap meanwhile
                logger.info("blocks [%d, %d) no longer need this peer: staying", start, end)
                return
            adapter = await self.loader.adapter_for(start)
            loaded = await self.loader.load(start, end, adapter)
            info = self.loader.info(loaded, record.public_name)
            draining = self.servicer.move_to(
                loaded.span, info, loaded.adapter, self.settings.drain_timeout
            )
            # the main announcer takes these blocks over (stop joins a thread: off the loop)
            await asyncio.to_thread(joining.stop, None)
            handed_over = True
            self.announcer.move(
                loaded.blocks,
                start=start,
                end=end,
                state=PeerState.ONLINE,
                decode_steps_per_s=loaded.decode_rate,
                adapters=loaded.adapters,
            )
            self.moves += 1
            print(
                f"swarmllm peer moved: blocks [{old.start}, {old.stop}) -> [{start}, {end}) "
                f"({loaded.decode_rate:.1f} decode steps/s); {draining} sessions from before "
                f"drain within {self.settings.drain_timeout:.0f} s",
                flush=True,
            )
        finally:
            if not handed_over:
                await asyncio.to_thread(joining.stop, PeerState.OFFLINE)

    def _rival(self, coverage: CoverageMap, start: int, end: int) -> str | None:
        """A peer with a smaller id that is joining blocks of ``[start, end)`` too."""
        for block in range(start, end):
            for peer_id, record in coverage.blocks[block].items():
                if peer_id < self.peer_id and record.state == PeerState.JOINING:
                    return peer_id
        return None

    def _still_better(self, coverage: CoverageMap) -> tuple[int, int] | None:
        """``better_span`` again, as if this peer were not joining: its own JOINING records and
        those of peers that give way to it (larger ids) left out."""
        yielding = {
            peer_id
            for peer_id, record in coverage.peers().items()
            if record.state == PeerState.JOINING and peer_id > self.peer_id
        }
        view = coverage.without(yielding)
        blocks = [
            {
                peer_id: record
                for peer_id, record in block.items()
                if peer_id != self.peer_id or record.state == PeerState.ONLINE
            }
            for block in view.blocks
        ]
        view = CoverageMap(view.model_id, view.num_blocks, blocks, view.extra)
        return better_span(view, self.peer_id, self.settings.quality)

    async def _coverage(self) -> CoverageMap:
        source = self.loader.source
        return await live_coverage(self.dht, source.model_id, source.config.num_hidden_layers)
