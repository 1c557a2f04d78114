"""Reading the coverage map: which peers announced which blocks of a model, in one DHT round.

A read takes at most ``MAX_RECORDS_PER_KEY`` records per key, live peers' first (ranked as DHT
nodes rank what they keep, ``swarmllm.dht.storage``), so its cost does not grow with the number
of records anyone minted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarmllm.dht.node import run_bounded
from swarmllm.dht.records import CoverageMap, PeerRecord, block_key
from swarmllm.dht.storage import live_peers_of, strongest

logger = logging.getLogger("swarmllm.dht")


# per key: (subkey, value, expiration) of every dictionary entry found
_RawEntries = dict[str, list[tuple[object, object, float]]]


def get_coverage(
    dht: hivemind.DHT,
    model_id: str,
    num_blocks: int,
    extra_blocks: Sequence[str] = (),
    timeout: float = 5.0,
) -> CoverageMap:
    """Look up blocks ``0..num_blocks-1`` and the named ``extra_blocks`` of ``model_id`` at once.

    Malformed and expired records are skipped, and so is a record under a numbered block
    outside the span it names (a peer that moved leaves such records behind); a block nobody
    announced maps to ``{}``.
    Raises TimeoutError if the lookup does not finish within ``timeout`` seconds.
    """
    keys = [block_key(model_id, block) for block in range(num_blocks)]
    keys += [block_key(model_id, name) for name in extra_blocks]
    found = run_bounded(dht, partial(_get_in_dht, keys, timeout), timeout)
    if found is None:
        raise TimeoutError(
            f"reading the coverage of {model_id!r} ({len(keys)} DHT keys) "
            f"timed out after {timeout:.1f} s"
        )
    now = get_dht_time()
    parsed = {key: _parse(key, found[key], now) for key in keys}
    blocks = [
        {
            peer_id: record
            for peer_id, record in parsed[block_key(model_id, block)].items()
            if record.start <= block < record.end
        }
        for block in range(num_blocks)
    ]
    return CoverageMap(
        model_id=model_id,
        num_blocks=num_blocks,
        blocks=blocks,
        extra={name: parsed[block_key(model_id, name)] for name in extra_blocks},
    )


async def _get_in_dht(
    keys: list[str], timeout: float, _dht: hivemind.DHT, node: DHTNode
) -> _RawEntries | None:
    """Runs in the DHT process; returns None on timeout (raising there would log a traceback).

    ``sufficient_expiration_time=inf`` makes hivemind visit every node holding a key and merge
    their dictionaries, instead of stopping at the first node that has any entry. Of each
    key's merged entries only the strongest ``MAX_RECORDS_PER_KEY`` leave the process.
    """
    try:
        found = await asyncio.wait_for(
            node.get_many(keys, sufficient_expiration_time=float("inf")), timeout
        )
    except asyncio.TimeoutError:
        return None
    raw: _RawEntries = {}
    is_live = live_peers_of(node)
    for key in keys:
        entry = found[key]
        if entry is not None and isinstance(entry.value, dict):
            items = list(entry.value.items())
            kept = strongest(is_live, [(sub, item.expiration_time) for sub, item in items])
            raw[key] = [(s, item.value, item.expiration_time) for s, item in items if s in kept]
        else:
            raw[key] = []  # absent, or a plain value (swarmllm only stores dictionaries)
    return raw


def _parse(
    key: str, entries: list[tuple[object, object, float]], now: float
) -> dict[str, PeerRecord]:
    records: dict[str, PeerRecord] = {}
    for peer_id, value, expiration in entries:
        if expiration < now:
            continue
        if not isinstance(peer_id, str) or not isinstance(value, bytes):
            logger.debug(
                "skipping DHT entry under %s: subkey %r is not a peer id record", key, peer_id
            )
            continue
        try:
            records[peer_id] = PeerRecord.from_bytes(value)
        except ValueError as e:
            logger.debug("skipping record of %s under %s: %s", peer_id, key, e)
    return records
