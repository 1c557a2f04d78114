"""When the router reuses its coverage map and when it reads the DHT again."""

from __future__ import annotations

import asyncio
import threading

from swarmllm.client.bans import BanList
from swarmllm.client.router import Router

MAX_AGE = 0.5


class CountingConnection:
    """Stands in for the DHT: every coverage read returns a new, numbered map."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.reads = delay, 0
        self._lock = threading.Lock()

    def coverage(self, model_id: str, num_blocks: int) -> str:
        threading.Event().wait(self.delay)
        with self._lock:
            self.reads += 1
            return f"map {self.reads}"


def router(connection: CountingConnection) -> Router:
    return Router(connection, "model", 4, BanList(), max_age=MAX_AGE)


def test_a_recent_map_is_reused_and_a_retry_reads_anew() -> None:
    async def scenario() -> None:
        connection = CountingConnection()
        routes = router(connection)
        assert await routes.read_coverage(fresh=False) == ("map 1", False)
        assert await routes.read_coverage(fresh=False) == ("map 1", True)
        assert await routes.read_coverage(fresh=True) == ("map 2", False)
        assert connection.reads == 2

    asyncio.run(scenario())


def test_a_map_past_its_age_is_read_again() -> None:
    async def scenario() -> None:
        routes = router(CountingConnection())
        await routes.read_coverage(fresh=False)
        await asyncio.sleep(MAX_AGE + 0.05)
        assert await routes.read_coverage(fresh=False) == ("map 2", False)

    asyncio.run(scenario())


def test_sessions_opened_together_share_one_read() -> None:
    async def scenario() -> None:
        connection = CountingConnection(delay=0.1)
        routes = router(connection)
        maps = await asyncio.gather(*(routes.read_coverage(fresh=False) for _ in range(4)))
        assert {coverage for coverage, _ in maps} == {"map 1"}
        assert connection.reads == 1

    asyncio.run(scenario())
