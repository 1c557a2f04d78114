"""Block selection for a new peer on synthetic coverage maps."""

from __future__ import annotations

import pytest
from coverage_maps import coverage, record

from swarmllm.dht.records import CoverageMap, PeerState
from swarmllm.peer.selection import better_span, choose_span


def test_empty_swarm_takes_the_first_blocks():
    assert choose_span(coverage(30, {}), 10) == (0, 10)
    assert choose_span(coverage(30, {}), 30) == (0, 30)


def test_fills_a_gap_in_the_middle():
    peers = {"A": record(0, 10), "C": record(20, 30)}
    assert choose_span(coverage(30, peers), 10) == (10, 20)


def test_wider_window_covers_the_whole_gap_leftmost():
    peers = {"A": record(0, 10), "C": record(20, 30)}
    # every 12-block window from 8 to 10 contains the 10 uncovered blocks; 8 is leftmost
    assert choose_span(coverage(30, peers), 12) == (8, 20)


def test_joining_peer_counts_as_covering():
    peers = {"A": record(0, 10, state=PeerState.JOINING, throughput=0.0)}
    assert choose_span(coverage(30, peers), 10) == (10, 20)


def test_offline_peer_does_not_count():
    peers = {"A": record(0, 10, state=PeerState.OFFLINE), "B": record(10, 30)}
    assert choose_span(coverage(30, peers), 10) == (0, 10)


def test_fully_covered_swarm_reinforces_the_weakest_part():
    peers = {
        "A": record(0, 10, throughput=50.0),
        "B": record(10, 20, throughput=5.0),
        "C": record(20, 30, throughput=50.0),
    }
    assert choose_span(coverage(30, peers), 10) == (10, 20)


def test_the_weakest_block_decides_not_the_sum():
    # per block: 1, 100, 10, 10. Summed, [2, 4) looks weakest (20 against 101); its weakest
    # block serves 10 steps/s, but block 0 serves only 1: the swarm's bottleneck is there
    peers = {
        "A": record(0, 1, throughput=1.0),
        "B": record(1, 2, throughput=100.0),
        "C": record(2, 4, throughput=10.0),
    }
    assert choose_span(coverage(4, peers), 2) == (0, 2)


def test_block_throughputs_add_up_over_their_servers():
    # block 0 has two servers of 6 (12 in all), block 2 one of 10: block 2 is the bottleneck
    peers = {
        "A": record(0, 2, throughput=6.0),
        "B": record(0, 2, throughput=6.0),
        "C": record(2, 4, throughput=10.0),
    }
    assert choose_span(coverage(4, peers), 1) == (2, 3)


def test_equal_bottlenecks_are_decided_by_the_next_weakest_block():
    # per block: 5, 6, 100, 5, 7, 8. [0, 3) and [3, 6) both bottleneck at 5; next comes 6
    # against 7, so [0, 3) is weaker, though its sum (111) is far above [3, 6)'s (20)
    per_block = [5.0, 6.0, 100.0, 5.0, 7.0, 8.0]
    peers = {f"p{i}": record(i, i + 1, throughput=t) for i, t in enumerate(per_block)}
    assert choose_span(coverage(6, peers), 3) == (0, 3)


def test_joining_peer_throughput_counts():
    peers = {
        "A": record(0, 15, throughput=10.0),
        "B": record(15, 30, state=PeerState.JOINING, throughput=40.0),
    }
    assert choose_span(coverage(30, peers), 10) == (0, 10)


def test_equal_throughput_ties_go_left():
    peers = {"A": record(0, 30, throughput=10.0)}
    assert choose_span(coverage(30, peers), 10) == (0, 10)


def test_own_records_are_excluded():
    # a restarting peer whose old records linger must still see its blocks as a gap
    peers = {"me": record(20, 30), "B": record(0, 20)}
    assert choose_span(coverage(30, peers), 10, exclude_peer="me") == (20, 30)
    assert choose_span(coverage(30, peers), 10) == (0, 10)


@pytest.mark.parametrize("num_blocks", [0, -1, 31])
def test_rejects_impossible_span_lengths(num_blocks: int):
    with pytest.raises(ValueError, match="between 1 and 30"):
        choose_span(coverage(30, {}), num_blocks)


def test_rejects_inconsistent_map():
    broken = CoverageMap(model_id="m", num_blocks=30, blocks=[{}] * 29)
    with pytest.raises(ValueError, match="lists 29 blocks"):
        choose_span(broken, 10)


# ------------------------------------------------------------------ rebalancing


def test_a_replica_moves_to_a_span_that_lost_all_its_peers():
    peers = {"A": record(0, 10), "B": record(0, 10), "C": record(10, 20)}
    assert better_span(coverage(30, peers), "B", 0.75) == (20, 30)
    assert better_span(coverage(30, peers), "A", 0.75) == (20, 30)


def test_the_only_server_of_a_block_never_leaves_it_for_a_gap():
    peers = {"A": record(0, 10), "C": record(10, 20)}
    assert better_span(coverage(30, peers), "A", 1.0) is None
    assert better_span(coverage(30, peers), "C", 1.0) is None


def test_a_move_must_raise_the_bottleneck_by_the_quality_margin():
    # 0-9 has 30 steps/s, 10-19 has 10: moving B's 10 evens it out at 20 (a 2x gain)
    peers = {
        "A": record(0, 10, throughput=10),
        "B": record(0, 10),
        "X": record(0, 10),
        "C": record(10, 20),
        "D": record(20, 30, throughput=100),
    }
    assert better_span(coverage(30, peers), "B", 0.75) == (10, 20)
    # 0-9 at 20, 10-19 at 15: without B, 0-9 would be the weakest span: B stays where it is
    peers = {
        "A": record(0, 10),
        "B": record(0, 10),
        "C": record(10, 20, throughput=15),
        "D": record(20, 30, throughput=100),
    }
    assert better_span(coverage(30, peers), "B", 0.75) is None


def test_a_small_gain_stays_below_the_margin():
    # 0-9: 30 (3 peers), 10-19: 20 (2 peers, one at 10), 20-29: 19 (1 peer): B moving to
    # 20-29 gives a bottleneck of 20 against 19, below the 4/3 a move needs at quality 0.75
    peers = {
        "A": record(0, 10), "B": record(0, 10), "X": record(0, 10),
        "C": record(10, 20), "E": record(10, 20),
        "D": record(20, 30, throughput=19),
    }  # fmt: skip
    assert better_span(coverage(30, peers), "B", 0.75) is None
    assert better_span(coverage(30, peers), "B", 1.0) == (20, 30)


def test_nobody_moves_while_a_peer_is_joining():
    peers = {"A": record(0, 10), "B": record(0, 10), "J": record(20, 30, PeerState.JOINING, 0.0)}
    assert better_span(coverage(30, peers), "B", 0.75) is None
    del peers["J"]
    assert better_span(coverage(30, peers), "B", 0.75) == (10, 20)


def test_a_peer_that_is_not_online_does_not_move():
    peers = {"A": record(0, 10), "B": record(0, 10, PeerState.OFFLINE)}
    assert better_span(coverage(30, peers), "B", 0.75) is None
    assert better_span(coverage(30, peers), "Z", 0.75) is None  # no record at all
    with pytest.raises(ValueError, match="balance quality"):
        better_span(coverage(30, peers), "A", 0.0)
