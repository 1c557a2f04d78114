"""An inference session across a chain of peers, with failover that replays history.

The client keeps, for every hop, the inputs it has sent (positions 0..n). When a hop fails it
bans the peer, routes only that hop's blocks again (possibly across several peers), replays the
stored inputs to rebuild their caches, and retries the step where it failed. Replay restarts
from position 0, so the replacement's cache matches the failed peer's exactly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

import torch

from swarmllm.client.bans import BanList
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec
from swarmllm.client.routing import Hop, find_route

logger = logging.getLogger("swarmllm.client")


class SessionFailedError(RuntimeError):
    """A step could not complete within the failover budget."""


class Router:
    """Finds routes over the live coverage map, avoiding banned and busy peers."""

    def __init__(
        self,
        connection: SwarmConnection,
        model_id: str,
        num_blocks: int,
        bans: BanList,
        allowed: Collection[str] | None = None,
    ):
        self.connection, self.model_id, self.num_blocks = connection, model_id, num_blocks
        self.bans, self.allowed = bans, allowed

    async def route(
        self, start: int, end: int, *, min_cache_tokens: int, avoid: Collection[str] = ()
    ) -> list[Hop]:
        loop = asyncio.get_running_loop()
        coverage = await loop.run_in_executor(
            None, self.connection.coverage, self.model_id, self.num_blocks
        )
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
        )


class InferenceSession:
    def __init__(self, router: Router, spec: SessionSpec, *, max_failovers: int = 8):
        self.router, self.spec, self.max_failovers = router, spec, max_failovers
        self.hops: list[HopStream] = []
        self.history: list[list[torch.Tensor]] = []  # per hop: the inputs sent, in order
        self.position = 0
        self._busy: set[str] = set()

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    async def open(self) -> None:
        self.hops, self.history = await self._connect(0, self.router.num_blocks, history=None)

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through every hop, starting at ``position``
        (default: right after the previous step; an earlier position rewinds)."""
        position = self.position if position is None else position
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
            try:
                output = await self.hops[index].step(hidden, position)
            except HopFailure as failure:
                self._penalise(failure)
                await self._fail_over(index)
                continue  # retry this step on the replacement
            self.history[index].append(hidden)
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
        streams, histories = await self._connect(failed.hop.start, failed.hop.end, history)
        self.hops[index : index + 1] = streams
        self.history[index : index + 1] = histories

    async def _connect(
        self, start: int, end: int, history: torch.Tensor | None
    ) -> tuple[list[HopStream], list[list[torch.Tensor]]]:
        """Open streams over a route for ``[start, end)`` and replay ``history`` through them,
        retrying on failures within the failover budget. Returns the streams and the inputs
        each has seen."""
        for _attempt in range(self.max_failovers):
            route = await self.router.route(
                start,
                end,
                min_cache_tokens=self.spec.max_length * self.spec.batch,
                avoid=self._busy,
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
                        replay = await stream.step(replay, 0)
                return streams, histories
            except HopFailure as failure:
                self._penalise(failure)
                await asyncio.gather(*(s.close() for s in streams))
        raise SessionFailedError(
            f"blocks {start}-{end - 1}: no working peer after {self.max_failovers} attempts"
        )

    def _rewind(self, position: int) -> None:
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
