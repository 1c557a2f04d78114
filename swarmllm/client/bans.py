"""Peers the client avoids for a while after a fault, with backoff on repeat offences."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("swarmllm.client")

UNREACHABLE = "did not answer a ping"  # the reason for a peer that is gone, not misbehaving


class BanList:
    def __init__(self, base_seconds: float = 30.0, max_seconds: float = 600.0):
        self.base_seconds, self.max_seconds = base_seconds, max_seconds
        self._until: dict[str, float] = {}
        self._offences: dict[str, int] = {}
        self._reasons: dict[str, str] = {}

    def ban(self, peer_id: str, reason: str) -> float:
        """Ban ``peer_id``; each repeat offence doubles the ban. Returns its length in seconds."""
        offences = self._offences.get(peer_id, 0) + 1
        self._offences[peer_id] = offences
        seconds = min(self.base_seconds * 2 ** (offences - 1), self.max_seconds)
        self._until[peer_id] = time.monotonic() + seconds
        self._reasons[peer_id] = reason
        logger.warning("banned peer %s for %.0f s: %s", peer_id, seconds, reason)
        return seconds

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, until in self._until.items() if until > now}

    def reason(self, peer_id: str) -> str | None:
        """Why ``peer_id`` was last banned (None if it never was)."""
        return self._reasons.get(peer_id)

    def rejections(self) -> dict[str, str]:
        """Each banned peer with why routing skips it: ``unreachable`` for a peer that did not
        answer a ping (likely gone), ``banned`` for a fault."""
        return {
            peer: "unreachable" if self._reasons.get(peer) == UNREACHABLE else "banned"
            for peer in self.banned()
        }
