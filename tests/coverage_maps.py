"""Synthetic coverage maps for the block selection and rebalancing tests."""

from __future__ import annotations

from swarmllm.dht.records import CoverageMap, PeerRecord, PeerState


def record(
    start: int, end: int, state: PeerState = PeerState.ONLINE, throughput: float = 10.0
) -> PeerRecord:
    return PeerRecord(
        state=state,
        start=start,
        end=end,
        decode_steps_per_s=throughput,
        cache_tokens_left=1000,
        version="0.1.0",
        dtype="float32",
    )


def coverage(num_blocks: int, peers: dict[str, PeerRecord], model_id: str = "m") -> CoverageMap:
    """A map where every peer's record sits at each block of its span, as the DHT reader builds."""
    blocks: list[dict[str, PeerRecord]] = [{} for _ in range(num_blocks)]
    for peer_id, peer in peers.items():
        for block in range(peer.start, peer.end):
            blocks[block][peer_id] = peer
    return CoverageMap(model_id=model_id, num_blocks=num_blocks, blocks=blocks)
