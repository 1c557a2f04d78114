"""Choosing which blocks a peer should serve: the part of the model the swarm serves worst, at
start (``choose_span``) and later, when moving there would help the swarm (``better_span``)."""

from __future__ import annotations

from swarmllm.dht.records import CoverageMap, PeerState

# JOINING counts as serving: two peers started close together must not pick the same gap
_SERVING = (PeerState.ONLINE, PeerState.JOINING)


def choose_span(
    coverage: CoverageMap, num_blocks: int, exclude_peer: str | None = None
) -> tuple[int, int]:
    """The window ``[start, start + num_blocks)`` with the most blocks nobody serves, then the
    weakest bottleneck; ties go to the leftmost window.

    A block's throughput is the sum of its servers' (each serves every step through it); a
    window is as good as its weakest block, so windows compare by their blocks' throughputs
    sorted weakest first, as Petals' ``_choose_best_start`` does: a new peer goes where it
    raises the swarm's bottleneck, not where the total over the window is lowest.
    ``exclude_peer``'s own records are ignored (a restarting peer must not count itself).
    """
    if not 1 <= num_blocks <= coverage.num_blocks:
        raise ValueError(
            f"cannot serve {num_blocks} blocks of {coverage.model_id!r}: "
            f"choose between 1 and {coverage.num_blocks}"
        )
    if len(coverage.blocks) != coverage.num_blocks:
        raise ValueError(
            f"coverage map of {coverage.model_id!r} lists {len(coverage.blocks)} blocks "
            f"but the model has {coverage.num_blocks}"
        )
    uncovered, throughput = _service(coverage, exclude_peer)
    best_start = min(
        range(coverage.num_blocks - num_blocks + 1),
        key=lambda start: (
            -sum(uncovered[start : start + num_blocks]),
            sorted(throughput[start : start + num_blocks]),
            start,
        ),
    )
    return best_start, best_start + num_blocks


def better_span(coverage: CoverageMap, peer_id: str, quality: float) -> tuple[int, int] | None:
    """Where ``peer_id`` (serving its ONLINE span) should move, or None to stay.

    The target is ``choose_span``'s for a span as long as the peer's, the others' records as
    they are. The move is worth it when it leaves fewer blocks nobody serves, or as many and
    the swarm's bottleneck (the throughput of its worst-served block) now below ``quality``
    times the bottleneck after the move (Petals' ``balance_quality``: 0.75 moves for a gain
    of a third or more). A peer that alone serves a block never leaves it for a block nobody
    serves: that would trade one gap for another. Nobody moves while a peer is JOINING (its
    throughput is not known yet, and a peer that moves announces JOINING first): of the peers
    that see one gap, the first to move holds the others back until its move is done.
    """
    if not 0 < quality <= 1:
        raise ValueError(f"balance quality must be in (0, 1], got {quality}")
    peers = coverage.peers()
    mine = peers.get(peer_id)
    if mine is None or mine.state != PeerState.ONLINE:
        return None
    if any(record.state == PeerState.JOINING for record in peers.values()):
        return None
    target = choose_span(coverage, mine.end - mine.start, exclude_peer=peer_id)
    if target == (mine.start, mine.end):
        return None
    uncovered_now, throughput_now = _service(coverage)
    uncovered_after, throughput_after = _service(coverage, exclude_peer=peer_id)
    for block in range(*target):
        uncovered_after[block] = False
        throughput_after[block] += mine.decode_steps_per_s
    gaps_now, gaps_after = sum(uncovered_now), sum(uncovered_after)
    if gaps_after != gaps_now:
        return target if gaps_after < gaps_now else None
    return target if min(throughput_now) < quality * min(throughput_after) else None


def _service(
    coverage: CoverageMap, exclude_peer: str | None = None
) -> tuple[list[bool], list[float]]:
    """Per block: whether nobody serves it, and its servers' summed throughput (every step
    through a block goes through one of them)."""
    serving = [
        [
            record
            for peer_id, record in peers.items()
            if peer_id != exclude_peer and record.state in _SERVING
        ]
        for peers in coverage.blocks
    ]
    uncovered = [not records for records in serving]
    throughput = [sum(record.decode_steps_per_s for record in records) for records in serving]
    return uncovered, throughput


def uncovered_blocks(coverage: CoverageMap) -> list[int]:
    """The blocks that no peer serves or is joining."""
    uncovered, _ = _service(coverage)
    return [block for block, nobody in enumerate(uncovered) if nobody]
