"""Choosing which blocks a new peer should serve: the part of the model the swarm serves worst."""

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
    best_start = min(
        range(coverage.num_blocks - num_blocks + 1),
        key=lambda start: (
            -sum(uncovered[start : start + num_blocks]),
            sorted(throughput[start : start + num_blocks]),
            start,
        ),
    )
    return best_start, best_start + num_blocks
