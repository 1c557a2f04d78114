"""A DHT node's storage with a bound on the records it keeps per key, live peers' first.

Anyone can mint identities and sign records for them: a signed record proves only that its key
exists, not that a peer runs behind it. hivemind keeps every valid record a node is asked to
store, so a flood of minted records made every key's dictionary grow without bound and every
coverage read verify all of them (1,000 identities: 3.1 s a read; 2,500: past the timeout).

Here a key's dictionary holds at most ``MAX_RECORDS_PER_KEY`` records. When it is full, a new
record takes the place of the weakest one only if it ranks higher, by (whether the owner is a
live node this node knows: itself or one in its routing table, expiration capped at
``RANK_HORIZON`` from now). Minted identities have no process, so they are never in a routing
table: they cannot push out the record of a peer that answers, and a far-future expiration
(up to ``MAX_RECORD_TTL``) buys them nothing over an honest peer's refreshed one. Readers rank
and cap what they read the same way (``coverage.get_coverage``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

MAX_RECORDS_PER_KEY = 64  # peers serving one block that a node keeps and a reader reads
RANK_HORIZON = 60.0  # seconds: expirations later than this rank as this

IsLive = Callable[[object], bool]


def rank(is_live: IsLive, subkey: object, expiration: float, now: float) -> tuple[bool, float]:
    """How strongly a record deserves its place (higher is stronger)."""
    return is_live(subkey), min(expiration, now + RANK_HORIZON)


def strongest(
    is_live: IsLive, entries: list[tuple[object, float]], limit: int = MAX_RECORDS_PER_KEY
) -> set[object]:
    """The subkeys of the ``limit`` strongest of ``entries`` (subkey, expiration)."""
    now = get_dht_time()
    ranked = sorted(entries, key=lambda entry: rank(is_live, *entry, now), reverse=True)
    return {subkey for subkey, _ in ranked[:limit]}


class BoundedStorage(DHTLocalStorage):
    """``DHTLocalStorage`` whose dictionaries keep at most ``MAX_RECORDS_PER_KEY`` records."""

    def __init__(self, is_live: IsLive, maxsize: float | None = None):
        super().__init__(maxsize=None if maxsize == float("inf") else maxsize)
        self._is_live = is_live

    def store(self, key: DHTID, value, expiration_time: float, subkey=None) -> bool:
        if subkey is None and isinstance(value, DictionaryDHTValue):
            value = self._bounded(value)  # a whole dictionary: a found value being cached
        return super().store(key, value, expiration_time, subkey)

    def store_subkey(self, key: DHTID, subkey, value: bytes, expiration_time: float) -> bool:
        found = self.get(key)
        if found is not None and isinstance(found.value, DictionaryDHTValue):
            entries = found.value
            full = subkey not in entries and len(entries) >= MAX_RECORDS_PER_KEY
            if full and not self._make_room(entries, subkey, expiration_time):
                return False
        return super().store_subkey(key, subkey, value, expiration_time)

    def _make_room(self, entries: DictionaryDHTValue, subkey: object, expiration: float) -> bool:
        """Drop the weakest record for a new one that ranks higher; False if none ranks lower."""
        now = get_dht_time()
        weakest, item = min(
            entries.items(), key=lambda entry: rank(self._is_live, entry[0], entry[1][1], now)
        )
        if rank(self._is_live, weakest, item.expiration_time, now) >= rank(
            self._is_live, subkey, expiration, now
        ):
            return False
        del entries[weakest]
        return True

    def _bounded(self, dictionary: DictionaryDHTValue) -> DictionaryDHTValue:
        items = list(dictionary.items())
        if len(items) <= MAX_RECORDS_PER_KEY:
            return dictionary
        kept = strongest(self._is_live, [(sub, item.expiration_time) for sub, item in items])
        bounded = DictionaryDHTValue()
        for sub, item in items:
            if sub in kept:
                bounded.store(sub, item.value, item.expiration_time)
        return bounded


@functools.lru_cache(maxsize=4096)
def _peer_id(subkey: str) -> PeerID | None:
    try:
        return PeerID.from_base58(subkey)
    except Exception:  # not base58, or not a multihash
        return None


def live_peers_of(node: DHTNode) -> IsLive:
    """Whether a subkey names this node or a node in its routing table (one that answered)."""

    def is_live(subkey: object) -> bool:
        if not isinstance(subkey, str) or (peer := _peer_id(subkey)) is None:
            return False
        return peer == node.peer_id or node.protocol.routing_table.get(peer_id=peer) is not None

    return is_live


async def bound_storage(_dht, node: DHTNode) -> None:
    """(in the DHT's process) Put bounded storage in place of the node's storage and cache."""
    is_live = live_peers_of(node)
    for name in ("storage", "cache"):
        old = getattr(node.protocol, name)
        if isinstance(old, BoundedStorage):
            continue
        new = BoundedStorage(is_live, maxsize=old.maxsize)
        for key, item in old.items():
            new.store(key, item.value, item.expiration_time)
        setattr(node.protocol, name, new)
