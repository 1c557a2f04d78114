"""When the router reuses its coverage map and when it reads the DHT again; which peers it
pings before routing through them."""

from __future__ import annotations

import asyncio
import threading

from coverage_maps import coverage, record

from swarmllm.client.bans import BanList
from swarmllm.client.router import Router
from swarmllm.client.routing import Hop
from swarmllm.dht.records import PeerState

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


class PingingConnection:
    """A fixed map of an ONLINE peer, one that is gone, and one still JOINING; records pings."""

    def __init__(self):
        peers = {"A": record(0, 4), "gone": record(0, 4), "J": record(0, 4, PeerState.JOINING)}
        self.map, self.rtt, self.pinged = coverage(4, peers), {}, []

    def coverage(self, model_id: str, num_blocks: int):
        return self.map

    async def ping_all(self, peers: list[str]) -> None:
        self.pinged += peers
        self.rtt.update({peer: 0.001 for peer in peers if peer != "gone"})


def test_only_online_peers_are_pinged_and_only_the_silent_one_is_banned() -> None:
    """A joining peer's server may not answer yet: a ping then would ban it for its first
    seconds of service, when it may be the one peer taking over a lost span."""
    connection = PingingConnection()
    routes = Router(connection, "model", 4, BanList())
    route = asyncio.run(routes.route(0, 4, min_cache_tokens=0))
    assert route == [Hop("A", 0, 4)]
    assert sorted(connection.pinged) == ["A", "gone"]
    assert routes.bans.banned() == {"gone"}
