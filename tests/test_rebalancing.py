"""The rebalancer's decisions that need no swarm: the re-check after its JOINING wait, a move
that would not fit in memory, and a gap that starts a check early."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from coverage_maps import coverage, record

from swarmllm.dht.records import PeerState
from swarmllm.peer import rebalancing
from swarmllm.peer.rebalancing import BalanceSettings, Rebalancer
from swarmllm.peer.selection import uncovered_blocks


def _rebalancer(peer_id: str, fits: int = 100, announced=None, period: float = 1.0) -> Rebalancer:
    dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer_id))
    announcer = SimpleNamespace(record=announced)
    settings = BalanceSettings(period=period, quality=0.75, drain_timeout=5.0, fits=fits)
    return Rebalancer(dht, announcer, servicer=None, loader=None, settings=settings)


def test_after_its_wait_a_mover_ignores_its_own_joining_records_and_those_that_yield_to_it():
    peers = {
        "A": record(0, 10),
        "M": record(0, 10),  # the mover: ONLINE on 0-9, JOINING on 20-29 (added below)
        "C": record(10, 20),
        "Z": record(20, 30, PeerState.JOINING, 0.0),  # a larger id: it gives way to M
    }
    view = coverage(30, peers)
    for block in range(20, 30):
        view.blocks[block]["M"] = record(20, 30, PeerState.JOINING, 10.0)
    assert _rebalancer("M")._still_better(view) == (20, 30)


def test_after_its_wait_a_mover_stays_when_the_gap_was_filled():
    peers = {"A": record(0, 10), "M": record(0, 10), "C": record(10, 20), "F": record(20, 30)}
    view = coverage(30, peers)
    for block in range(20, 30):
        view.blocks[block]["M"] = record(20, 30, PeerState.JOINING, 10.0)
    assert _rebalancer("M")._still_better(view) is None


def test_a_move_that_needs_room_for_both_spans_is_not_started():
    mover = _rebalancer("M", fits=15, announced=record(0, 10))
    asyncio.run(mover.move(20, 30))  # the stand-in DHT would fail if anything were announced
    assert mover.moves == 0


def test_a_gap_cuts_the_wait_for_a_check_short(monkeypatch):
    """A look every GAP_WATCH seconds that finds blocks nobody serves starts the check long
    before the balance period is up; a map without gaps waits the period out."""
    monkeypatch.setattr(rebalancing, "GAP_WATCH", 0.01)
    mover = _rebalancer("M", period=3600.0)
    maps = [
        coverage(30, {"M": record(0, 10), "C": record(10, 30)}),
        coverage(30, {"M": record(0, 10)}),  # the peer of 10-29 is gone
    ]
    looks = []

    async def read() -> object:
        looks.append(len(looks))
        return maps[min(len(looks) - 1, 1)]

    mover._coverage = read
    asyncio.run(asyncio.wait_for(mover._wait_for_check(), timeout=5))
    assert len(looks) == 2


def test_a_block_someone_is_joining_is_not_a_gap():
    joining = coverage(20, {"A": record(0, 10), "J": record(10, 20, PeerState.JOINING, 0.0)})
    assert uncovered_blocks(joining) == []
    assert uncovered_blocks(coverage(20, {"A": record(0, 10)})) == list(range(10, 20))
