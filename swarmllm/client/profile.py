"""Where a generation's time goes: the client's own parts, and per hop the round trip against
what the peer reports in its reply: ``compute_ms`` (its forward pass), ``queue_ms`` (waiting for
it), ``peer_ms`` (its whole handling of the step) and ``batch`` (sessions in that pass).

Steps are split into phases: ``prefill`` (a step of several tokens), ``decode`` (one token) and
``verify`` (one new token followed by draft tokens, in speculative decoding).
A hop's round trip splits into compute + queue + peer overhead (checking, signing, encoding)
+ transport (the rest: both P2P daemons, the sockets, the client's own decoding and checks).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from swarmllm.client.routing import Hop

PHASES = ("prefill", "decode", "verify")


@dataclass(frozen=True)
class HopTiming:
    """One step of one hop, as the client saw it and as the peer reported it (seconds)."""

    round_trip: float  # from sending the step to its verified reply
    compute: float  # the peer's forward pass
    queued: float  # the step's wait on the peer before that pass
    handled: float  # the peer's whole handling of the step, compute and queue included
    batch: int  # sessions the peer ran in that pass

    @classmethod
    def from_reply(cls, round_trip: float, meta: dict[str, Any]) -> HopTiming:
        """The peer's figures are informational (not signed): garbage reads as zero."""

        def number(key: str) -> float:
            value = meta.get(key)
            return float(value) if isinstance(value, (int, float)) and value >= 0 else 0.0

        return cls(
            round_trip,
            number("compute_ms") / 1e3,
            number("queue_ms") / 1e3,
            number("peer_ms") / 1e3,
            max(1, int(number("batch"))),
        )


@dataclass
class _HopTotals:
    steps: int = 0
    round_trip: float = 0.0
    compute: float = 0.0
    queued: float = 0.0
    handled: float = 0.0
    batch: float = 0.0

    def add(self, timing: HopTiming) -> None:
        self.steps += 1
        for field in fields(HopTiming):
            setattr(self, field.name, getattr(self, field.name) + getattr(timing, field.name))

    def means(self) -> dict[str, float]:
        """Milliseconds per step of each part of the round trip, and the mean batch."""
        per_step = 1e3 / self.steps
        return {
            "round_trip_ms": self.round_trip * per_step,
            "compute_ms": self.compute * per_step,
            "queue_ms": self.queued * per_step,
            "peer_overhead_ms": (self.handled - self.compute - self.queued) * per_step,
            "transport_ms": (self.round_trip - self.handled) * per_step,
            "mean_batch": self.batch / self.steps,
        }


def phase_of(num_tokens: int, drafts: int = 0) -> str:
    """The phase of a step of ``num_tokens`` tokens, ``drafts`` of them draft tokens."""
    if num_tokens - drafts > 1:
        return "prefill"
    return "verify" if drafts else "decode"


class Profile:
    """Accumulates timings over any number of steps and sessions; see ``summary``."""

    def __init__(self) -> None:
        self._client: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._steps: dict[str, int] = defaultdict(int)
        self._hops: dict[str, dict[Hop, _HopTotals]] = defaultdict(dict)

    @contextlib.contextmanager
    def part(self, phase: str, name: str) -> Iterator[None]:
        """Time a part of the client's work (``embed``, ``swarm``, ``head``, ``sampling``);
        each ``swarm`` part counts as one step."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._client[phase][name] += time.perf_counter() - started
            if name == "swarm":
                self._steps[phase] += 1

    def add_hop(self, hop: Hop, phase: str, timing: HopTiming) -> None:
        self._hops[phase].setdefault(hop, _HopTotals()).add(timing)

    def summary(self) -> dict[str, Any]:
        """Per phase: steps, the client's milliseconds per step by part, and per hop the
        round trip and its parts in milliseconds per step (see the module's docstring)."""
        result: dict[str, Any] = {}
        for phase in PHASES:
            steps = self._steps.get(phase, 0)
            if not steps:
                continue
            hops = [
                {"peer_id": hop.peer_id, "blocks": [hop.start, hop.end], "steps": totals.steps}
                | totals.means()
                for hop, totals in self._hops[phase].items()
            ]
            client = {name: 1e3 * seconds / steps for name, seconds in self._client[phase].items()}
            result[phase] = {"steps": steps, "client_ms": client, "hops": hops}
        return result

    def format(self) -> str:
        """The summary as a few lines of text, for ``--profile``."""
        lines = []
        for phase, data in self.summary().items():
            client = data["client_ms"]
            parts = "  ".join(f"{name} {ms:.2f}" for name, ms in client.items())
            lines.append(f"{phase}: {data['steps']} steps, ms per step: {parts}")
            for hop in data["hops"]:
                lines.append(
                    f"  hop {hop['peer_id'][-8:]} blocks {hop['blocks'][0]}-{hop['blocks'][1] - 1}:"
                    f" round trip {hop['round_trip_ms']:.2f} = compute {hop['compute_ms']:.2f}"
                    f" + queue {hop['queue_ms']:.2f} + peer {hop['peer_overhead_ms']:.2f}"
                    f" + transport {hop['transport_ms']:.2f} (mean batch {hop['mean_batch']:.1f})"
                )
            # every session's step passes through a hop that starts at block 0 once
            session_steps = sum(h["steps"] for h in data["hops"] if h["blocks"][0] == 0)
            if session_steps:
                in_hops = sum(h["round_trip_ms"] * h["steps"] for h in data["hops"]) / session_steps
                swarm = client.get("swarm", 0.0)
                lines.append(
                    f"  swarm {swarm:.2f} = a session's hops {in_hops:.2f} + the rest "
                    f"{swarm - in_hops:.2f} (sessions stepped together overlap their hops)"
                )
        return "\n".join(lines)


def measure(profile: Profile | None, phase: str, name: str) -> contextlib.AbstractContextManager:
    """``profile.part(phase, name)``, or nothing when profiling is off."""
    return profile.part(phase, name) if profile is not None else contextlib.nullcontext()
