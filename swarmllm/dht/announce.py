"""Announcing a peer's blocks in the DHT, once or continuously with refresh before expiry.

hivemind keeps, for each (key, subkey), the value with the *latest* expiration time and rejects
stores that expire earlier. So every announcement here expires strictly later than the previous
one, and a final OFFLINE announcement cannot expire sooner than the last ONLINE one would have.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarmllm.dht.node import PROCESS_MARGIN, run_bounded
from swarmllm.dht.records import PeerRecord, PeerState, block_key
from swarmllm.security.record_validator import MAX_RECORD_TTL

logger = logging.getLogger("swarmllm.dht")

STORE_TIMEOUT = 10.0


class AnnounceError(RuntimeError):
    """No block of an announcement could be stored in the DHT."""


def announce(
    dht: hivemind.DHT,
    model_id: str,
    blocks: Sequence[int | str],
    record: PeerRecord,
    expiration: float,
    timeout: float = STORE_TIMEOUT,
) -> None:
    """Store ``record`` under every block's key with this peer's id as subkey, in one DHT round.

    ``expiration`` is absolute DHT time (``hivemind.get_dht_time()``). Raises AnnounceError if
    the store fails for every block or does not finish within ``timeout`` seconds; a partial
    failure is logged as a warning.
    """
    _store(dht, dht.peer_id.to_base58(), model_id, blocks, record, expiration, timeout)


def _store(
    dht: hivemind.DHT,
    peer_id: str,
    model_id: str,
    blocks: Sequence[int | str],
    record: PeerRecord,
    expiration: float,
    timeout: float,
) -> None:
    if not blocks:
        raise ValueError("announce needs at least one block")
    keys = [block_key(model_id, block) for block in blocks]
    store = partial(_store_in_dht, keys, peer_id, record.to_bytes(), expiration, timeout)
    stored = run_bounded(dht, store, timeout)
    if stored is None:
        raise AnnounceError(
            f"announcing {keys[0]}..{keys[-1]} ({len(keys)} keys) timed out after {timeout:.1f} s"
        )
    failed = [key for key in keys if not stored[key]]
    if len(failed) == len(keys):
        raise AnnounceError(
            f"the DHT stored none of {len(keys)} keys {keys[0]}..{keys[-1]} for peer {peer_id} "
            "(no node answered, a validator rejected the record, or a later-expiring one exists)"
        )
    if failed:
        logger.warning("DHT did not store %d of %d keys: %s", len(failed), len(keys), failed)


async def _store_in_dht(
    keys: list[str],
    subkey: str,
    value: bytes,
    expiration: float,
    timeout: float,
    _dht: hivemind.DHT,
    node: DHTNode,
) -> dict[str, bool] | None:
    """Runs in the DHT process; returns None on timeout (raising there would log a traceback)."""
    try:
        stored = await asyncio.wait_for(
            node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys)),
            timeout,
        )
    except asyncio.TimeoutError:
        return None
    return {key: bool(stored[key, subkey]) for key in keys}


class Announcer:
    """Keeps a peer's record for its blocks alive in the DHT from a daemon thread.

    The record is re-stored every ``refresh_period`` seconds with expiration ``now + ttl``;
    ``ttl`` must exceed two refresh periods so that one failed refresh does not let it lapse,
    and stay within ``MAX_RECORD_TTL``, the longest life DHT nodes accept.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        model_id: str,
        blocks: Sequence[int | str],
        record: PeerRecord,
        refresh_period: float = 30.0,
        ttl: float = 90.0,
        store_timeout: float = STORE_TIMEOUT,
    ):
        if not blocks:
            raise ValueError("Announcer needs at least one block")
        if refresh_period <= 0 or not 2 * refresh_period < ttl <= MAX_RECORD_TTL:
            raise ValueError(
                f"need refresh_period > 0 and 2 * refresh_period < ttl <= {MAX_RECORD_TTL:.0f} s "
                f"(the DHT refuses records that live longer), "
                f"got refresh_period={refresh_period}, ttl={ttl}"
            )
        self.dht = dht
        self.model_id = model_id
        self.blocks = list(blocks)
        self.refresh_period = refresh_period
        self.ttl = ttl
        self.store_timeout = store_timeout
        self.peer_id = dht.peer_id.to_base58()
        self._record = record
        self._dropped: list[int | str] = []  # blocks left by move(), to be marked OFFLINE once
        self._last_expiration = float("-inf")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmllm-announcer", daemon=True)

    @property
    def record(self) -> PeerRecord:
        with self._lock:
            return self._record

    def start(self) -> None:
        """Announce the current record now (in the background) and keep refreshing it."""
        self._thread.start()

    def update(self, **changes: Any) -> None:
        """Change record fields (e.g. ``state=PeerState.ONLINE``); re-announce without waiting."""
        with self._lock:
            if self._stopped.is_set():
                raise RuntimeError("Announcer.update() after stop()")
            self._record = dataclasses.replace(self._record, **changes)
        self._wake.set()

    def move(self, blocks: Sequence[int | str], **changes: Any) -> None:
        """Announce under ``blocks`` from now on (with record ``changes``, e.g. a new span);
        blocks left behind get one OFFLINE record, so nobody counts on them any longer."""
        if not blocks:
            raise ValueError("Announcer.move needs at least one block")
        with self._lock:
            if self._stopped.is_set():
                raise RuntimeError("Announcer.move() after stop()")
            self._record = dataclasses.replace(self._record, **changes)
            left = [block for block in self.blocks if block not in blocks]
            self._dropped += [block for block in left if block not in self._dropped]
            self._dropped = [block for block in self._dropped if block not in blocks]
            self.blocks = list(blocks)
        self._wake.set()

    def stop(self, final_state: PeerState | None = PeerState.OFFLINE) -> None:
        """Stop refreshing and announce ``final_state``; returns within about 2 × store_timeout.

        The final record outlives the last refreshed one by a moment (see module docstring), so
        readers see ``final_state`` until the record would have expired anyway. With
        ``final_state`` None nothing more is announced: another announcer took the blocks over
        (its records expire later, so they win).
        """
        with self._lock:
            self._stopped.set()
            if final_state is not None:
                self._record = dataclasses.replace(self._record, state=final_state)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.store_timeout + PROCESS_MARGIN)
        if final_state is not None:
            self._announce(ttl=self.refresh_period, final=True)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            self._announce(ttl=self.ttl, final=False)
            self._wake.wait(self.refresh_period)

    def _announce(self, ttl: float, final: bool) -> None:
        with self._lock:
            if self._stopped.is_set() and not final:
                return  # stop() is about to announce the final record
            record, blocks, dropped = self._record, list(self.blocks), self._dropped
            self._dropped = []
            # strictly later than any earlier announcement, or the DHT would keep the older one
            expiration = max(get_dht_time() + ttl, self._last_expiration + 1e-3)
            self._last_expiration = expiration
        announcements = [(blocks, record)]
        if dropped:
            announcements.append((dropped, dataclasses.replace(record, state=PeerState.OFFLINE)))
        for keys, announced in announcements:
            try:
                _store(
                    self.dht,
                    self.peer_id,
                    self.model_id,
                    keys,
                    announced,
                    expiration,
                    self.store_timeout,
                )
            except Exception as e:
                logger.warning(
                    "announcing %s blocks %s as %s failed: %s",
                    self.model_id,
                    keys,
                    announced.state.name,
                    e,
                )
