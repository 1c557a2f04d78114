"""Routing on synthetic coverage maps: cost model, filters, errors, determinism."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from coverage_maps import coverage

from swarmllm.client.routing import Hop, NoRouteError, find_route, format_route
from swarmllm.dht.records import PeerRecord, PeerState

RTT = 0.005  # find_route's default_rtt


def record(
    start: int,
    end: int,
    throughput: float = 100.0,
    *,
    state: PeerState = PeerState.ONLINE,
    cache: int = 10_000,
    adapters: tuple[str, ...] = (),
) -> PeerRecord:
    return PeerRecord(
        state=state,
        start=start,
        end=end,
        decode_steps_per_s=throughput,
        cache_tokens_left=cache,
        version="test",
        dtype="float32",
        adapters=adapters,
    )


def route_cost(route: list[Hop], peers: dict[str, PeerRecord], rtt: dict[str, float]) -> float:
    total = 0.0
    for hop in route:
        rec = peers[hop.peer_id]
        total += rtt.get(hop.peer_id, RTT)
        total += (hop.end - hop.start) / (rec.end - rec.start) / rec.decode_steps_per_s
    return total


def brute_force_cost(
    peers: dict[str, PeerRecord], rtt: dict[str, float], start: int, end: int, adapter: str | None
) -> float:
    """Shortest path over *every* block boundary and every sub-span of every peer."""
    best = {start: 0.0}
    for a in range(start, end):
        if a not in best:
            continue
        for b in range(a + 1, end + 1):
            for peer_id, rec in peers.items():
                if a == start and adapter is not None and adapter not in rec.adapters:
                    continue
                if rec.start <= a and b <= rec.end:
                    cost = best[a] + route_cost([Hop(peer_id, a, b)], peers, rtt)
                    best[b] = min(best.get(b, math.inf), cost)
    return best.get(end, math.inf)


def assert_valid(route: list[Hop], peers: dict[str, PeerRecord], start: int, end: int) -> None:
    assert route[0].start == start
    assert route[-1].end == end
    for previous, hop in itertools.pairwise(route):
        assert previous.end == hop.start
    for hop in route:
        assert peers[hop.peer_id].start <= hop.start < hop.end <= peers[hop.peer_id].end


def test_single_peer_serving_all() -> None:
    assert find_route(coverage(30, {"A": record(0, 30)})) == [Hop("A", 0, 30)]


def test_three_disjoint_spans() -> None:
    peers = {"C": record(20, 30), "A": record(0, 10), "B": record(10, 20)}
    assert find_route(coverage(30, peers)) == [Hop("A", 0, 10), Hop("B", 10, 20), Hop("C", 20, 30)]


def test_gaps_are_all_named() -> None:
    peers = {"A": record(0, 10), "B": record(15, 20), "C": record(21, 25)}
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers, model_id="tiny-llama"))
    assert info.value.uncovered == [(10, 15), (20, 21), (25, 30)]
    message = str(info.value)
    assert "blocks 10-14 (5 blocks" in message
    assert "block 20 (1 block" in message
    assert "blocks 25-29 (5 blocks" in message
    assert "tiny-llama" in message
    assert "no peer announced it" in message


def test_gap_message_says_why_peers_were_not_usable() -> None:
    peers = {
        "A": record(0, 10),
        "B": record(10, 20, state=PeerState.OFFLINE),
        "C": record(10, 20),
        "D": record(10, 20),
        "E": record(10, 20, state=PeerState.JOINING),
        "F": record(20, 30),
    }
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers), banned={"C", "D"})
    assert info.value.uncovered == [(10, 20)]
    message = str(info.value)
    assert "2 peers banned" in message
    assert "1 peer offline" in message
    assert "1 peer joining" in message


@pytest.mark.parametrize(
    ("options", "transient"),
    [
        ({}, True),  # nobody announced 10-19: a peer may come
        ({"banned": {"B": "unreachable", "C": "banned"}}, True),  # left, or failed lately
        ({"allowed": {"A", "D"}}, False),  # the client's own list excludes B and C
        ({"min_cache_tokens": 1000}, False),  # B and C are too short of cache for the session
        ({"banned": {"B": "unreachable"}, "allowed": {"A", "B", "D"}}, False),  # one of each
    ],
    ids=["none", "gone", "not-allowed", "short-of-cache", "mixed"],
)
def test_a_gap_is_transient_only_when_no_choice_of_the_client_made_it(
    options: dict, transient: bool
) -> None:
    """A failover waits for blocks whose peers left; one that the client's own filters
    uncovered fails at once (waiting would not help)."""
    peers = {"A": record(0, 10), "D": record(20, 30)}
    if options:
        peers |= {"B": record(10, 20, cache=100), "C": record(10, 20, cache=100)}
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers), **options)
    assert info.value.uncovered == [(10, 20)]
    assert info.value.transient is transient


def test_fast_peer_covering_more_beats_two_slow_ones() -> None:
    peers = {"S1": record(0, 10, 10.0), "S2": record(10, 20, 10.0), "F": record(0, 20, 50.0)}
    assert find_route(coverage(20, peers)) == [Hop("F", 0, 20)]


def test_two_fast_peers_beat_a_very_slow_one_when_rtt_is_small() -> None:
    peers = {"V": record(0, 20, 1.0), "A": record(0, 10, 100.0), "B": record(10, 20, 100.0)}
    assert find_route(coverage(20, peers)) == [Hop("A", 0, 10), Hop("B", 10, 20)]


def test_rtt_decides_between_one_slower_hop_and_two_faster_ones() -> None:
    # V: rtt + 0.1 s; A then B: 2 rtt + 0.02 s. The break-even RTT is 0.08 s.
    peers = {"V": record(0, 20, 10.0), "A": record(0, 10, 100.0), "B": record(10, 20, 100.0)}
    cov = coverage(20, peers)
    near = {"V": 0.05, "A": 0.05, "B": 0.05}
    far = {"V": 0.2, "A": 0.2, "B": 0.2}
    assert find_route(cov, rtt=near) == [Hop("A", 0, 10), Hop("B", 10, 20)]
    assert find_route(cov, rtt=far) == [Hop("V", 0, 20)]


def test_switches_from_a_slow_peer_as_early_as_possible() -> None:
    # Using S to the end of its span would be a valid but slower route.
    peers = {"S": record(0, 20, 1.0), "F": record(10, 30, 100.0)}
    assert find_route(coverage(30, peers)) == [Hop("S", 0, 10), Hop("F", 10, 30)]


def test_lower_rtt_wins_between_equal_peers() -> None:
    peers = {"A": record(0, 30), "B": record(0, 30)}
    assert find_route(coverage(30, peers), rtt={"A": 0.1, "B": 0.001}) == [Hop("B", 0, 30)]


def test_unknown_rtt_uses_default() -> None:
    peers = {"A": record(0, 30), "B": record(0, 30)}
    cov = coverage(30, peers)
    assert find_route(cov, rtt={"A": 0.02}, default_rtt=0.001) == [Hop("B", 0, 30)]
    assert find_route(cov, rtt={"A": 0.02}, default_rtt=0.05) == [Hop("A", 0, 30)]


def test_invalid_rtt_is_rejected() -> None:
    with pytest.raises(ValueError, match="RTT for peer A"):
        find_route(coverage(30, {"A": record(0, 30)}), rtt={"A": math.nan})


def test_ties_are_broken_by_peer_id_whatever_the_map_order() -> None:
    for order in (["B", "A", "C"], ["C", "A", "B"], ["A", "B", "C"]):
        peers = {peer_id: record(0, 30) for peer_id in order}
        assert find_route(coverage(30, peers)) == [Hop("A", 0, 30)]


def test_tied_two_hop_routes_are_deterministic() -> None:
    # X1/X2 and Y1/Y2 are interchangeable; the lexicographically smallest pair wins.
    peers = {
        "Y2": record(10, 20),
        "X2": record(10, 20),
        "Y1": record(0, 10),
        "X1": record(0, 10),
    }
    expected = [Hop("X1", 0, 10), Hop("X2", 10, 20)]
    assert find_route(coverage(20, peers)) == expected
    assert find_route(coverage(20, dict(reversed(peers.items())))) == expected


def test_costs_equal_up_to_rounding_prefer_fewer_hops() -> None:
    # Both cost 0.03 s exactly on paper; in floats the single hop comes out 3.5e-18 s dearer.
    peers = {"A": record(0, 10, 100.0), "B": record(10, 20, 100.0), "Z": record(0, 20, 40.0)}
    assert find_route(coverage(20, peers)) == [Hop("Z", 0, 20)]


def test_exactly_tied_routes_prefer_fewer_hops() -> None:
    # A, B, C and D, E both cost exactly 1.5 s (all terms are dyadic); every other route costs
    # more. The three-hop route reaches the last boundary from an earlier node, so a search that
    # keeps the first of equal routes would return it.
    peers = {
        "A": record(0, 1, 8.0),
        "B": record(1, 2, 8.0),
        "C": record(2, 8, 1.0),
        "D": record(0, 6, 4 / 3),
        "E": record(6, 8, 4.0),
    }
    rtt = {"A": 0.0, "B": 0.0, "C": 0.25, "D": 0.25, "E": 0.25}
    route = find_route(coverage(8, peers), rtt=rtt)
    assert route == [Hop("D", 0, 6), Hop("E", 6, 8)]
    assert route_cost(route, peers, rtt) == route_cost(
        [Hop("A", 0, 1), Hop("B", 1, 2), Hop("C", 2, 8)], peers, rtt
    )


def test_slow_peer_is_avoided() -> None:
    peers = {"A": record(0, 30, 2.0), "B": record(0, 30, 100.0)}
    assert find_route(coverage(30, peers)) == [Hop("B", 0, 30)]


@pytest.mark.parametrize("throughput", [0.0, -5.0, math.nan])
def test_peer_without_usable_throughput_is_a_last_resort(throughput: float) -> None:
    lone = {"A": record(0, 30, throughput)}
    assert find_route(coverage(30, lone)) == [Hop("A", 0, 30)]
    both = {"A": record(0, 30, throughput), "B": record(0, 30, 0.01)}
    assert find_route(coverage(30, both)) == [Hop("B", 0, 30)]


@pytest.mark.parametrize(
    ("fast_peer", "kwargs"),
    [
        (record(0, 30, 1000.0), {"banned": {"FAST"}}),
        (record(0, 30, 1000.0, state=PeerState.OFFLINE), {}),
        (record(0, 30, 1000.0, state=PeerState.JOINING), {}),
        (record(0, 30, 1000.0, cache=99), {"min_cache_tokens": 100}),
        (record(0, 30, 1000.0), {"allowed": {"SLOW"}}),
    ],
    ids=["banned", "offline", "joining", "short-of-cache", "not-allowed"],
)
def test_unusable_fast_peer_is_avoided(fast_peer: PeerRecord, kwargs: dict) -> None:
    peers = {"FAST": fast_peer, "SLOW": record(0, 30, 10.0)}
    assert find_route(coverage(30, peers), **kwargs) == [Hop("SLOW", 0, 30)]


def test_enough_cache_is_usable() -> None:
    peers = {"FAST": record(0, 30, 1000.0, cache=100), "SLOW": record(0, 30, 10.0)}
    assert find_route(coverage(30, peers), min_cache_tokens=100) == [Hop("FAST", 0, 30)]


def test_allowed_list_that_excludes_a_range_names_it() -> None:
    peers = {"A": record(0, 15), "B": record(15, 30)}
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers), allowed={"A"})
    assert info.value.uncovered == [(15, 30)]
    assert "1 peer not in the allowed list" in str(info.value)


def test_record_found_outside_its_own_span_is_ignored() -> None:
    cov = coverage(20, {"A": record(0, 10), "B": record(10, 20)})
    cov.blocks[12]["A"] = cov.blocks[0]["A"]  # A claims [0, 10) but shows up at block 12
    cov.blocks[12].pop("B")
    with pytest.raises(NoRouteError) as info:
        find_route(cov)
    assert info.value.uncovered == [(12, 13)]


def test_sub_range_uses_only_that_range() -> None:
    peers = {"A": record(0, 5), "P": record(5, 25), "Z": record(28, 30)}  # gaps outside [10, 20)
    assert find_route(coverage(30, peers), start=10, end=20) == [Hop("P", 10, 20)]


def test_sub_range_gaps_are_reported_within_the_range_only() -> None:
    peers = {"A": record(0, 15), "B": record(17, 22)}
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers), start=10, end=20)
    assert info.value.uncovered == [(15, 17)]


def test_sub_range_charges_only_the_used_part_of_a_span() -> None:
    # W serves 30 blocks at 3 tokens/s: 10 of them cost 1/9 s, less than N's 1/5 s for the
    # same 10 blocks; a cost model charging W's whole span (1/3 s) would pick N.
    peers = {"W": record(0, 30, 3.0), "N": record(10, 20, 5.0)}
    assert find_route(coverage(30, peers), start=10, end=20) == [Hop("W", 10, 20)]


@pytest.mark.parametrize(("start", "end"), [(5, 5), (7, 3), (-1, 10), (0, 31)])
def test_bad_range_is_rejected(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="block range"):
        find_route(coverage(30, {"A": record(0, 30)}), start=start, end=end)


def test_first_hop_adapter_forces_the_first_peer() -> None:
    peers = {"V": record(0, 10, 1000.0, adapters=("vision",)), "A": record(0, 30, 100.0)}
    cov = coverage(30, peers)
    assert find_route(cov) == [Hop("A", 0, 30)]
    assert find_route(cov, first_hop_adapter="vision") == [Hop("V", 0, 10), Hop("A", 10, 30)]


def test_slow_adapter_peer_runs_as_few_blocks_as_possible() -> None:
    # V is much slower per block than A, so it should hand over right after block `start`,
    # a boundary where the set of usable peers does not change.
    peers = {
        "V": record(0, 10, adapters=("vision",)),
        "W": record(5, 20, adapters=("vision",)),
        "A": record(0, 30, 1000.0),
    }
    cov = coverage(30, peers)
    assert find_route(cov, first_hop_adapter="vision") == [Hop("V", 0, 1), Hop("A", 1, 30)]
    assert find_route(cov, start=10, first_hop_adapter="vision") == [
        Hop("W", 10, 11),
        Hop("A", 11, 30),
    ]


def test_missing_adapter_is_reported() -> None:
    peers = {"V": record(0, 10, adapters=("vision",)), "A": record(0, 30)}
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers), first_hop_adapter="audio")
    assert info.value.missing_adapter == "audio"
    assert info.value.uncovered == []
    assert "'audio' adapter" in str(info.value)
    assert "no peer announced it" in str(info.value)


def test_banned_adapter_peer_is_reported() -> None:
    peers = {"V": record(0, 10, adapters=("vision",)), "A": record(0, 30)}
    with pytest.raises(NoRouteError) as info:
        find_route(coverage(30, peers), first_hop_adapter="vision", banned={"V"})
    assert info.value.missing_adapter == "vision"
    assert "1 peer banned" in str(info.value)


def test_matches_brute_force_on_random_swarms() -> None:
    rng = random.Random(1234)
    routed = 0
    for _ in range(200):
        num_blocks = rng.randint(1, 24)
        peers: dict[str, PeerRecord] = {}
        for n in range(rng.randint(1, 8)):
            a = rng.randrange(num_blocks)
            b = rng.randint(a + 1, num_blocks)
            throughput = rng.choice([1.0, 5.0, 20.0, 100.0, 500.0])
            adapters = ("vision",) if rng.random() < 0.3 else ()
            peers[f"p{n}"] = record(a, b, throughput, adapters=adapters)
        rtt = {peer_id: rng.choice([0.001, 0.005, 0.02, 0.1]) for peer_id in peers}
        start = rng.randrange(num_blocks)
        end = rng.randint(start + 1, num_blocks)
        adapter = "vision" if rng.random() < 0.5 else None
        cov = coverage(num_blocks, peers)
        try:
            route = find_route(cov, start=start, end=end, rtt=rtt, first_hop_adapter=adapter)
        except NoRouteError as e:
            covered = {b for rec in peers.values() for b in range(rec.start, rec.end)}
            missing = {b for a, z in e.uncovered for b in range(a, z)}
            assert missing == set(range(start, end)) - covered
            if not missing:
                assert e.missing_adapter == adapter
                assert brute_force_cost(peers, rtt, start, end, adapter) == math.inf
            continue
        routed += 1
        assert_valid(route, peers, start, end)
        if adapter is not None:
            assert adapter in peers[route[0].peer_id].adapters
        assert route_cost(route, peers, rtt) == pytest.approx(
            brute_force_cost(peers, rtt, start, end, adapter), rel=1e-9
        )
    assert routed > 50


def test_format_route_shortens_ids_and_adds_names() -> None:
    long_a = "12D3KooWAbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd"
    route = [Hop(long_a, 0, 10), Hop("short", 10, 11), Hop("12D3KooWZZZZZZZZZZwxyz", 11, 30)]
    text = format_route(route, public_names={long_a: "alice", "short": ""})
    assert text.splitlines() == [
        "blocks 0-9 → 12D3KooW…abcd (alice)",
        "block 10 → short",
        "blocks 11-29 → 12D3KooW…wxyz",
    ]
