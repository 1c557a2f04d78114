"""Announcing and reading coverage on a real three-node hivemind DHT on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import msgpack
import pytest
from dht_nodes import loopback_dht
from hivemind.utils import get_dht_time

from swarmllm.dht.announce import AnnounceError, Announcer, announce
from swarmllm.dht.coverage import get_coverage
from swarmllm.dht.ping import answering_peers
from swarmllm.dht.records import (
    MAX_PEER_RECORD_BYTES,
    CoverageMap,
    PeerRecord,
    PeerState,
    block_key,
)
from swarmllm.security.record_validator import MAX_RECORD_TTL


def record(start: int, end: int, state: PeerState = PeerState.ONLINE) -> PeerRecord:
    return PeerRecord(
        state=state,
        start=start,
        end=end,
        decode_steps_per_s=12.5,
        cache_tokens_left=4096,
        version="0.1.0",
        dtype="float32",
    )


class Swarm:
    """A reader node and two peer nodes; each test uses its own model id to stay independent."""

    def __init__(self) -> None:
        self.reader = loopback_dht()
        initial_peers = [str(maddr) for maddr in self.reader.get_visible_maddrs()]
        self.peers = [loopback_dht(initial_peers=initial_peers) for _ in range(2)]
        self.peer_ids = [dht.peer_id.to_base58() for dht in self.peers]

    def shutdown(self) -> None:
        for dht in [*self.peers, self.reader]:
            dht.shutdown()


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    swarm = Swarm()
    try:
        yield swarm
    finally:
        swarm.shutdown()


def wait_until(read: Callable[[], CoverageMap], done: Callable[[CoverageMap], bool]) -> CoverageMap:
    """Re-read coverage until ``done`` holds; fail after 10 s."""
    deadline = time.monotonic() + 10.0
    while True:
        coverage = read()
        if done(coverage) or time.monotonic() > deadline:
            return coverage
        time.sleep(0.2)


def test_third_node_sees_each_peer_on_its_blocks(swarm: Swarm):
    first, second = swarm.peers
    first_id, second_id = swarm.peer_ids
    now = get_dht_time()
    online, joining = record(0, 4), record(4, 8, state=PeerState.JOINING)
    announce(first, "span-model", [0, 1, 2, 3, "vision"], online, now + 30)
    announce(second, "span-model", range(4, 8), joining, now + 30)

    coverage = get_coverage(swarm.reader, "span-model", 10, extra_blocks=["vision", "audio"])

    assert coverage.model_id == "span-model" and coverage.num_blocks == 10
    assert coverage.blocks[:4] == [{first_id: online}] * 4
    assert coverage.blocks[4:8] == [{second_id: joining}] * 4
    assert coverage.blocks[8:] == [{}, {}]
    assert coverage.extra == {"vision": {first_id: online}, "audio": {}}
    assert coverage.uncovered_ranges() == [(4, 10)]


def test_two_peers_on_one_block_are_merged(swarm: Swarm):
    now = get_dht_time()
    for dht in swarm.peers:
        announce(dht, "shared-model", [0], record(0, 1), now + 30)
    coverage = get_coverage(swarm.reader, "shared-model", 1)
    assert set(coverage.blocks[0]) == set(swarm.peer_ids)


def test_malformed_and_foreign_entries_are_skipped(swarm: Swarm):
    first = swarm.peers[0]
    first_id = swarm.peer_ids[0]
    expiration = get_dht_time() + 30
    key = block_key("messy-model", 0)
    announce(first, "messy-model", [0], record(0, 1), expiration)
    assert first.store(key, b"\x93not a record", expiration, subkey="garbage-peer")
    # hivemind's heap compares subkeys of equal expiration, so give the int subkey its own
    assert first.store(key, record(0, 1).to_bytes(), expiration + 1, subkey=7)
    assert first.store(key, "a string value", expiration, subkey="string-peer")
    assert first.store(block_key("messy-model", 1), b"plain", expiration)

    coverage = get_coverage(swarm.reader, "messy-model", 2)

    assert coverage.blocks == [{first_id: record(0, 1)}, {}]


def test_announcer_update_refresh_and_stop(swarm: Swarm):
    first = swarm.peers[0]
    first_id = swarm.peer_ids[0]

    def read() -> CoverageMap:
        return get_coverage(swarm.reader, "live-model", 2)

    def state_of(coverage: CoverageMap) -> PeerRecord | None:
        return coverage.blocks[1].get(first_id)

    announcer = Announcer(
        first, "live-model", [0, 1], record(0, 2, PeerState.JOINING), refresh_period=1.0, ttl=3.0
    )
    announcer.start()
    try:
        coverage = wait_until(read, lambda c: state_of(c) is not None)
        assert state_of(coverage) == record(0, 2, PeerState.JOINING)

        announcer.update(state=PeerState.ONLINE, cache_tokens_left=17)
        coverage = wait_until(read, lambda c: state_of(c) == announcer.record)
        assert state_of(coverage) == replace(record(0, 2), cache_tokens_left=17)

        time.sleep(4.0)  # longer than the 3 s ttl: only refreshes keep the record alive
        assert state_of(read()) == announcer.record
    finally:
        announcer.stop()

    stopped = read()
    assert [block.get(first_id) for block in stopped.blocks] == [
        replace(record(0, 2, PeerState.OFFLINE), cache_tokens_left=17)
    ] * 2
    with pytest.raises(RuntimeError, match="after stop"):
        announcer.update(state=PeerState.ONLINE)


def test_record_without_refresh_expires(swarm: Swarm):
    first_id = swarm.peer_ids[0]
    announce(swarm.peers[0], "brief-model", [0], record(0, 1), get_dht_time() + 1.5)
    assert get_coverage(swarm.reader, "brief-model", 1).blocks[0] == {first_id: record(0, 1)}

    time.sleep(2.0)

    assert get_coverage(swarm.reader, "brief-model", 1).blocks == [{}]


def test_announce_that_no_node_accepts_raises(swarm: Swarm):
    with pytest.raises(AnnounceError, match="stored none of 2 keys"):
        announce(swarm.peers[0], "late-model", [0, 1], record(0, 2), get_dht_time() - 1)


def test_coverage_of_thirty_blocks_is_one_round(swarm: Swarm):
    now = get_dht_time()
    announce(swarm.peers[0], "big-model", range(15), record(0, 15), now + 30)
    announce(swarm.peers[1], "big-model", range(15, 30), record(15, 30), now + 30)
    get_coverage(swarm.reader, "big-model", 30)  # warm up connections

    started = time.perf_counter()
    coverage = get_coverage(swarm.reader, "big-model", 30)
    elapsed = time.perf_counter() - started

    assert coverage.fully_covered
    # sequential lookups cost ~30 round trips; one batched traversal stays well under a second
    assert elapsed < 1.0, f"reading 30 blocks took {elapsed:.2f} s"


def test_announcer_rejects_ttl_that_cannot_survive_a_missed_refresh(swarm: Swarm):
    with pytest.raises(ValueError, match="2 \\* refresh_period < ttl"):
        Announcer(swarm.peers[0], "m", [0], record(0, 1), refresh_period=5.0, ttl=10.0)


def test_announcer_rejects_ttl_the_dht_would_refuse(swarm: Swarm):
    with pytest.raises(ValueError, match="the DHT refuses records that live longer"):
        Announcer(
            swarm.peers[0], "m", [0], record(0, 1), refresh_period=10.0, ttl=MAX_RECORD_TTL + 1
        )


def _fields(**changes: object) -> dict[str, object]:
    fields = {
        "state": 2,
        "start": 0,
        "end": 1,
        "decode_steps_per_s": 1.0,
        "cache_tokens_left": 1,
        "version": "0.1.0",
        "dtype": "float32",
    }
    return {**fields, **changes}


@pytest.mark.parametrize(
    "hostile",
    [
        _fields(adapters=[""] * 500),  # small on the wire, 500 objects once decoded
        _fields(public_name="x" * 2000),  # over the size a peer may announce
        _fields(nested=[[[[]]]] * 100),  # an unknown field is ignored, not decoded without bound
    ],
    ids=["long list", "long string", "unknown nested field"],
)
def test_a_record_decodes_within_limits(hostile: dict[str, object]):
    with pytest.raises(ValueError, match="malformed peer record"):
        PeerRecord.from_bytes(msgpack.packb(hostile))
    assert PeerRecord.from_bytes(msgpack.packb(_fields())) == replace(
        record(0, 1), decode_steps_per_s=1.0, cache_tokens_left=1
    )


def test_a_record_too_long_to_announce_fails_where_it_is_made():
    with pytest.raises(ValueError, match="shorten the public name"):
        replace(record(0, 1), public_name="x" * MAX_PEER_RECORD_BYTES)


def test_a_moved_announcer_leaves_no_usable_record_behind(swarm: Swarm):
    first = swarm.peers[0]
    first_id = swarm.peer_ids[0]

    def read() -> CoverageMap:
        return get_coverage(swarm.reader, "moving-model", 4)

    announcer = Announcer(
        first, "moving-model", [0, 1], record(0, 2, PeerState.JOINING), refresh_period=1.0, ttl=3.0
    )
    announcer.start()
    try:
        wait_until(read, lambda c: first_id in c.blocks[0])
        announcer.move([2, 3], start=2, end=4)
        coverage = wait_until(read, lambda c: first_id in c.blocks[2] and not c.blocks[0])
        assert [set(block) for block in coverage.blocks] == [set(), set(), {first_id}, {first_id}]
        assert coverage.blocks[3][first_id] == record(2, 4, PeerState.JOINING)
    finally:
        announcer.stop()


def test_a_joining_announcer_hands_its_blocks_over_without_a_final_record(swarm: Swarm):
    """A peer moving to blocks 2-3 announces them JOINING beside its ONLINE 0-1, then its main
    announcer takes them over: the JOINING announcer stops without a last word, so nothing
    says OFFLINE where the peer now serves."""
    first, first_id = swarm.peers[0], swarm.peer_ids[0]

    def read() -> CoverageMap:
        return get_coverage(swarm.reader, "handover-model", 4)

    main = Announcer(first, "handover-model", [0, 1], record(0, 2), refresh_period=1.0, ttl=3.0)
    joining = Announcer(
        first,
        "handover-model",
        [2, 3],
        record(2, 4, PeerState.JOINING),
        refresh_period=1.0,
        ttl=3.0,
    )
    main.start()
    joining.start()
    try:
        both = wait_until(read, lambda c: first_id in c.blocks[0] and first_id in c.blocks[3])
        assert both.blocks[0][first_id].state == PeerState.ONLINE
        assert both.blocks[3][first_id].state == PeerState.JOINING
        joining.stop(final_state=None)
        main.move([2, 3], start=2, end=4)
        moved = wait_until(read, lambda c: not c.blocks[0])
        time.sleep(1.5)  # past a refresh: a final JOINING or OFFLINE record would show now
        moved = read()
        assert [set(block) for block in moved.blocks] == [set(), set(), {first_id}, {first_id}]
        assert moved.blocks[2][first_id] == record(2, 4)
    finally:
        main.stop()


def test_a_record_under_a_block_outside_its_span_is_skipped(swarm: Swarm):
    announce(swarm.peers[0], "misfiled-model", [0, 1], record(1, 2), get_dht_time() + 30)
    coverage = get_coverage(swarm.reader, "misfiled-model", 2)
    assert coverage.blocks == [{}, {swarm.peer_ids[0]: record(1, 2)}]
    assert coverage.without({swarm.peer_ids[0]}).blocks == [{}, {}]


def test_only_peers_that_answer_a_ping_are_reported(swarm: Swarm):
    gone = loopback_dht(initial_peers=[str(m) for m in swarm.reader.get_visible_maddrs()])
    gone_id = gone.peer_id.to_base58()
    gone.shutdown()
    assert answering_peers(swarm.reader, [*swarm.peer_ids, gone_id]) == set(swarm.peer_ids)
    assert answering_peers(swarm.reader, []) == set()
