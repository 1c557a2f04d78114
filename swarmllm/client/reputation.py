"""What the client has seen of each peer, and what that makes of the peer's own claims.

Anyone can mint identities and announce anything, so routing ranks peers by observation:

- A peer's announced throughput is only a hint, clamped to what a plausible device could do
  for this model (``plausible_block_seconds``): a lie of 1e9 tokens/s buys no more than an
  honest peer on the fastest accelerator would get.
- Once the client has timed a peer's decode steps, the measured time replaces the hint.
- A peer that has not yet served this client pays a risk premium: the chance that an attempt
  on it fails (from its record of sessions opened and attempts failed, with a prior of one of
  each) times what a failed attempt costs, spread over the session's tokens. So a proven peer
  keeps the route unless an unproven one promises clearly more.
- A peer that refused a session (busy, or any other refusal that is not counted as a fault)
  cools down for a while, doubling on repeats: routing uses it only when nothing else covers
  its blocks. It is not banned, since an honest peer can be full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from swarmllm.blocks.families import meta_layer

# The fastest a decoder layer can plausibly run one token: its weights read once at the memory
# bandwidth of a device beyond any current accelerator (at 4 bits a weight), and no less than a
# few kernel launches.
DEVICE_BYTES_PER_S = 1e13
BYTES_PER_WEIGHT = 0.5
MIN_LAYER_SECONDS = 5e-6

FAILED_ATTEMPT_SECONDS = 2.0  # what a failed attempt costs a session: a timeout, a re-route
COOLDOWN_SECONDS, MAX_COOLDOWN_SECONDS = 10.0, 300.0
MEASURED_WEIGHT = 0.3  # of a new decode timing in the moving average


def plausible_block_seconds(config: PretrainedConfig) -> float:
    """A lower bound on the seconds one decoder layer of ``config`` takes for one token."""
    weights = sum(param.numel() for param in meta_layer(config).parameters())
    return max(MIN_LAYER_SECONDS, weights * BYTES_PER_WEIGHT / DEVICE_BYTES_PER_S)


@dataclass
class _Record:
    opened: int = 0  # sessions it took (streams opened and, when asked, replayed)
    failed: int = 0  # attempts that failed on it, faults and refusals alike
    refusals: int = 0  # refusals in a row, for the cooldown's length
    cool_until: float = 0.0
    seconds_per_block: float | None = None  # measured decode time per block of a hop


class Reputation:
    """Per-peer observations of one client (shared by all its sessions)."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    def _get(self, peer_id: str) -> _Record:
        return self._records.setdefault(peer_id, _Record())

    def opened(self, peer_id: str) -> None:
        record = self._get(peer_id)
        record.opened += 1
        record.refusals, record.cool_until = 0, 0.0

    def failed(self, peer_id: str, *, refused: bool) -> None:
        """An attempt failed on the peer; ``refused``: by a refusal that is no fault (busy)."""
        record = self._get(peer_id)
        record.failed += 1
        if refused:
            record.refusals += 1
            cooldown = COOLDOWN_SECONDS * 2 ** (record.refusals - 1)
            record.cool_until = time.monotonic() + min(cooldown, MAX_COOLDOWN_SECONDS)

    def timed(self, peer_id: str, blocks: int, round_trip: float, rtt: float | None) -> None:
        """A decode step of ``blocks`` blocks came back after ``round_trip`` seconds."""
        compute = max(0.0, round_trip - (rtt or 0.0)) / max(1, blocks)
        record = self._get(peer_id)
        if record.seconds_per_block is None:
            record.seconds_per_block = compute
        else:
            record.seconds_per_block += MEASURED_WEIGHT * (compute - record.seconds_per_block)

    def failure_chance(self, peer_id: str) -> float:
        record = self._records.get(peer_id) or _Record()
        return (record.failed + 1) / (record.opened + record.failed + 2)

    def risk_premiums(self, peer_ids: Any, session_tokens: int) -> dict[str, float]:
        """Seconds per step added to a hop on each peer: its failure chance times what a
        failed attempt costs, spread over the session's tokens."""
        spread = FAILED_ATTEMPT_SECONDS / max(1, session_tokens)
        return {peer_id: self.failure_chance(peer_id) * spread for peer_id in peer_ids}

    def measured(self) -> dict[str, float]:
        """Measured decode seconds per block, for the peers the client has timed."""
        return {
            peer_id: record.seconds_per_block
            for peer_id, record in self._records.items()
            if record.seconds_per_block is not None
        }

    def cooling(self) -> dict[str, str]:
        """Peers that refused a session lately, with why routing uses them only as a last
        resort."""
        now = time.monotonic()
        return {
            peer_id: "refused a session lately"
            for peer_id, record in self._records.items()
            if record.cool_until > now
        }
