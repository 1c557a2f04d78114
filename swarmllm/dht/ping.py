"""Which peers of a coverage map answer: their DHT nodes, pinged from ours in one round; and
the coverage map of only those."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from functools import partial

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID

from swarmllm.dht.coverage import get_coverage
from swarmllm.dht.node import run_bounded
from swarmllm.dht.records import CoverageMap

PING_TIMEOUT = 3.0


def answering_peers(
    dht: hivemind.DHT, peer_ids: Collection[str], timeout: float = PING_TIMEOUT
) -> set[str]:
    """The peers among ``peer_ids`` whose DHT node answers a ping within ``timeout`` seconds.

    A peer's DHT node lives and dies with its process, so a record whose peer does not answer
    belongs to a peer that is gone (or cannot be reached, which for choosing blocks is the same).
    """
    if not peer_ids:
        return set()
    found = run_bounded(dht, partial(_ping_in_dht, sorted(peer_ids), timeout), timeout)
    return set(found or ())


async def _ping_in_dht(
    peer_ids: list[str], timeout: float, _dht: hivemind.DHT, node: DHTNode
) -> list[str]:
    async def ping(peer_id: str) -> str | None:
        try:
            answer = await asyncio.wait_for(
                node.protocol.call_ping(PeerID.from_base58(peer_id)), timeout
            )
        except (asyncio.TimeoutError, ValueError):
            return None
        return peer_id if answer is not None else None

    answers = await asyncio.gather(*(ping(peer_id) for peer_id in peer_ids))
    return [peer_id for peer_id in answers if peer_id is not None]


async def live_coverage(dht: hivemind.DHT, model_id: str, num_blocks: int) -> CoverageMap:
    """The coverage map without the records of peers that do not answer a ping (a peer that
    was killed leaves records that still say ONLINE until they expire)."""
    loop = asyncio.get_running_loop()
    coverage = await loop.run_in_executor(None, get_coverage, dht, model_id, num_blocks)
    others = set(coverage.peers()) - {dht.peer_id.to_base58()}
    answering = await loop.run_in_executor(None, answering_peers, dht, others)
    return coverage.without(others - answering)
