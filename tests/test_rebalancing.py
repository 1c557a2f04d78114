"""The rebalancer's decisions that need no swarm: the re-check after its JOINING wait, and a
move that would not fit in memory."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from coverage_maps import coverage, record

from swarmllm.dht.records import PeerState
from swarmllm.peer.rebalancing import BalanceSettings, Rebalancer


def _rebalancer(peer_id: str, fits: int = 100, announced=None) -> Rebalancer:
    dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer_id))
    announcer = SimpleNamespace(record=announced)
    settings = BalanceSettings(period=1.0, quality=0.75, drain_timeout=5.0, fits=fits)
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
