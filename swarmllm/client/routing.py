"""Choosing the chain of peers that serves a range of blocks at the lowest expected latency.

A route is a list of hops whose sub-spans are contiguous and cover the requested range. The cost
of one decode step through a hop is the client's measured RTT to the peer plus the peer's compute
time for the part of its span the hop uses, plus a risk premium for a peer without a record
(``reputation``); the route minimises the sum, so every extra hop has to pay for its RTT. The
compute time per block is the client's own measurement where it has one, else the announced
throughput's (``1 / span blocks / throughput``), never less than what a plausible device needs.

The search is a shortest path over block boundaries. Only boundaries where the set of usable
peers changes need to be nodes: between two of them every hop's cost is linear in where it
starts or ends, so moving such a boundary towards the cheaper neighbour never costs more. That
keeps the graph at O(peers) nodes instead of O(blocks).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from swarmllm.dht.records import PRECISIONS, CoverageMap, PeerRecord, PeerState, precision_rank

# A peer announcing zero, negative or NaN throughput is still usable, just as a last resort.
_MIN_THROUGHPUT = 1e-3  # tokens/s
# The default floor of a block's announced compute time: a lower bound for any model (the router
# passes the floor of the model it serves, ``reputation.plausible_block_seconds``).
MIN_BLOCK_SECONDS = 5e-6


@dataclass(frozen=True)
class Hop:
    """One link of a route: ``peer_id`` runs blocks ``[start, end)``."""

    peer_id: str
    start: int
    end: int


# Why a peer is skipped when the swarm may cure it by itself: the peer left, is still joining,
# did not answer or failed lately (another peer may come to serve its blocks). Every other
# reason is the client's own choice (allowed list, precision, cache size, busy in the session).
FAILED_JUST_NOW = "failed an attempt just now"
TRANSIENT_REASONS = frozenset({"offline", "joining", "unreachable", "banned", FAILED_JUST_NOW})


class NoRouteError(RuntimeError):
    """No chain of usable peers covers the requested blocks.

    ``uncovered`` lists the maximal block ranges ``[a, b)`` that no usable peer serves;
    ``missing_adapter`` names the adapter that no usable first-hop peer provides. ``transient``:
    every peer of the uncovered blocks was skipped for a reason in TRANSIENT_REASONS (or none
    announced them), so waiting for the swarm to re-cover them may help.
    """

    def __init__(
        self,
        message: str,
        uncovered: list[tuple[int, int]],
        missing_adapter: str | None = None,
        *,
        transient: bool = False,
    ):
        super().__init__(message)
        self.uncovered = uncovered
        self.missing_adapter = missing_adapter
        self.transient = transient


@dataclass(frozen=True)
class _Filter:
    banned: Mapping[str, str]  # peer id -> why it is skipped ("banned", "unreachable", ...)
    allowed: frozenset[str] | None
    min_cache_tokens: int
    min_precision: str | None = None

    def __post_init__(self) -> None:
        check_precision(self.min_precision)

    def rejection(self, peer_id: str, record: PeerRecord, block: int) -> str | None:
        """Why this peer can't serve this block, or None when it can."""
        if record.state == PeerState.OFFLINE:
            return "offline"
        if record.state != PeerState.ONLINE:
            return record.state.name.lower()
        if not record.start <= block < record.end:
            return "with a record inconsistent with its span"
        if peer_id in self.banned:
            return self.banned[peer_id]
        if self.allowed is not None and peer_id not in self.allowed:
            return "not in the allowed list"
        if record.cache_tokens_left < self.min_cache_tokens:
            return f"short of cache (under {self.min_cache_tokens} tokens left)"
        if not meets_precision(record, self.min_precision):
            return f"computing in {record.precision} (below {self.min_precision})"
        return None


def check_precision(min_precision: str | None) -> None:
    """Raise ValueError for a minimum precision that is not one of PRECISIONS."""
    if min_precision is not None and min_precision not in PRECISIONS:
        raise ValueError(
            f"min_precision must be one of {', '.join(PRECISIONS)} (or None), got {min_precision!r}"
        )


def meets_precision(record: PeerRecord, min_precision: str | None) -> bool:
    """Whether the peer computes at ``min_precision`` or finer (None accepts every peer)."""
    return min_precision is None or precision_rank(record.precision) >= precision_rank(
        min_precision
    )


def find_route(
    coverage: CoverageMap,
    *,
    start: int = 0,
    end: int | None = None,
    rtt: Mapping[str, float] | None = None,
    banned: Collection[str] | Mapping[str, str] = (),
    allowed: Collection[str] | None = None,
    min_cache_tokens: int = 0,
    first_hop_adapter: str | None = None,
    default_rtt: float = 0.005,
    min_precision: str | None = None,
    measured: Mapping[str, float] | None = None,
    min_block_seconds: float = MIN_BLOCK_SECONDS,
    premiums: Mapping[str, float] | None = None,
) -> list[Hop]:
    """The cheapest route through blocks ``[start, end)`` (default: the whole model).

    ``rtt`` maps peer ids to measured round-trip times in seconds (``default_rtt`` for the
    others). ``banned``: peers to skip, or a map of them to why (named in the error: "banned",
    "unreachable", "busy"). ``first_hop_adapter`` requires the hop holding block ``start`` to
    provide that adapter. ``min_precision`` (one of ``PRECISIONS``) skips peers computing
    coarser than it (quantized or in a lower-precision dtype). ``measured`` maps peers to the
    decode seconds per block the client timed (replacing their announced throughput), which is
    otherwise read as no faster than ``min_block_seconds``; ``premiums`` adds seconds to every
    hop on a peer (its risk). Equal-cost routes are broken by
    fewer hops, then by peer id, so the same inputs always give the same route. Raises
    NoRouteError when the filtered peers can't cover the range.
    """
    end = coverage.num_blocks if end is None else end
    if not 0 <= start < end <= coverage.num_blocks:
        raise ValueError(
            f"block range [{start}, {end}) is empty or outside model {coverage.model_id!r} "
            f"of {coverage.num_blocks} blocks"
        )
    peer_filter = _Filter(
        banned=dict(banned) if isinstance(banned, Mapping) else dict.fromkeys(banned, "banned"),
        allowed=None if allowed is None else frozenset(allowed),
        min_cache_tokens=min_cache_tokens,
        min_precision=min_precision,
    )
    usable: list[dict[str, PeerRecord]] = []  # usable[i - start]: peers usable for block i
    rejected: list[dict[str, str]] = []  # rejected[i - start]: peer -> why not
    for block in range(start, end):
        ok: dict[str, PeerRecord] = {}
        why: dict[str, str] = {}
        for peer_id, record in coverage.blocks[block].items():
            reason = peer_filter.rejection(peer_id, record, block)
            if reason is None:
                ok[peer_id] = record
            else:
                why[peer_id] = reason
        usable.append(ok)
        rejected.append(why)

    _raise_if_uncovered(coverage.model_id, start, usable, rejected)
    first_candidates = usable[0]
    if first_hop_adapter is not None:
        first_candidates = {
            peer_id: record
            for peer_id, record in first_candidates.items()
            if first_hop_adapter in record.adapters
        }
        if not first_candidates:
            why_not = {
                peer_id: reason
                for peer_id, reason in rejected[0].items()
                if first_hop_adapter in coverage.blocks[start][peer_id].adapters
            }
            raise NoRouteError(
                f"no usable peer serving block {start} of model {coverage.model_id!r} provides "
                f"the {first_hop_adapter!r} adapter ({_summarise(why_not)})",
                uncovered=[],
                missing_adapter=first_hop_adapter,
            )
    # A constrained first hop can't shrink to nothing, so it may need to end right after start.
    extra_node = start + 1 if first_hop_adapter is not None and start + 1 < end else None
    costs = _Costs(rtt or {}, default_rtt, measured or {}, min_block_seconds, premiums or {})
    return _cheapest(usable, start, first_candidates, extra_node, costs)


def format_route(route: Sequence[Hop], public_names: Mapping[str, str] | None = None) -> str:
    """One line per hop, e.g. ``blocks 0-9 → 12D3KooW…abcd (alice)``, for ``--show-route``."""
    names = public_names or {}
    lines = []
    for hop in route:
        line = f"{_blocks(hop.start, hop.end)} → {_short_id(hop.peer_id)}"
        if names.get(hop.peer_id):
            line += f" ({names[hop.peer_id]})"
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class _Costs:
    rtt: Mapping[str, float]
    default_rtt: float
    measured: Mapping[str, float]
    min_block_seconds: float
    premiums: Mapping[str, float]

    def fixed(self, peer_id: str) -> float:
        """What a hop on the peer costs besides its blocks: the RTT and the risk premium."""
        rtt = _checked_rtt(peer_id, self.rtt.get(peer_id, self.default_rtt))
        return rtt + self.premiums.get(peer_id, 0.0)

    def seconds_per_block(self, peer_id: str, record: PeerRecord) -> float:
        """Compute time per block for one decode step: measured, else the bounded claim."""
        if peer_id in self.measured:
            return self.measured[peer_id]
        throughput = record.decode_steps_per_s
        if not throughput > _MIN_THROUGHPUT:  # also catches NaN
            throughput = _MIN_THROUGHPUT
        return max(1.0 / ((record.end - record.start) * throughput), self.min_block_seconds)


def _cheapest(
    usable: list[dict[str, PeerRecord]],
    start: int,
    first_candidates: dict[str, PeerRecord],
    extra_node: int | None,
    costs: _Costs,
) -> list[Hop]:
    """Shortest path over block boundaries; assumes every block has a usable peer."""
    end = start + len(usable)
    # run_end[i][peer]: the first block after the contiguous run of usable blocks that
    # contains block start+i.
    run_end: list[dict[str, int]] = [{} for _ in usable]
    for i in reversed(range(len(usable))):
        following = run_end[i + 1] if i + 1 < len(usable) else {}
        run_end[i] = {peer_id: following.get(peer_id, start + i + 1) for peer_id in usable[i]}
    changes = {start + i for i in range(1, len(usable)) if usable[i] != usable[i - 1]}
    if extra_node is not None:
        changes.add(extra_node)
    nodes = [start, *sorted(changes), end]

    best: dict[int, tuple[float, tuple[Hop, ...]]] = {start: (0.0, ())}
    for index, a in enumerate(nodes[:-1]):
        cost_a, hops_a = best[a]
        candidates = first_candidates if a == start else usable[a - start]
        for peer_id in sorted(candidates):  # independent of map order even at the tolerance edge
            seconds_per_block = costs.seconds_per_block(peer_id, candidates[peer_id])
            reach = run_end[a - start][peer_id]
            fixed = cost_a + costs.fixed(peer_id)
            for b in nodes[index + 1 :]:
                if b > reach:
                    break
                candidate = (fixed + (b - a) * seconds_per_block, (*hops_a, Hop(peer_id, a, b)))
                if b not in best or _better(candidate, best[b]):
                    best[b] = candidate
    return list(best[end][1])


def _better(x: tuple[float, tuple[Hop, ...]], y: tuple[float, tuple[Hop, ...]]) -> bool:
    """Lower cost wins; costs equal up to rounding fall back to fewer hops, then peer ids."""
    if not math.isclose(x[0], y[0], rel_tol=1e-9, abs_tol=1e-12):
        return x[0] < y[0]
    return _tie_key(x[1]) < _tie_key(y[1])


def _tie_key(hops: tuple[Hop, ...]) -> tuple[int, list[tuple[str, int, int]]]:
    return len(hops), [(hop.peer_id, hop.start, hop.end) for hop in hops]


def _checked_rtt(peer_id: str, seconds: float) -> float:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"RTT for peer {peer_id} is {seconds!r}; expected finite seconds >= 0")
    return seconds


def _raise_if_uncovered(
    model_id: str, start: int, usable: list[dict[str, PeerRecord]], rejected: list[dict[str, str]]
) -> None:
    uncovered: list[tuple[int, int]] = []
    why_not: list[dict[str, str]] = []  # per range: peer -> first reason seen
    for i, peers in enumerate(usable):
        if peers:
            continue
        block = start + i
        if uncovered and uncovered[-1][1] == block:
            uncovered[-1] = (uncovered[-1][0], block + 1)
        else:
            uncovered.append((block, block + 1))
            why_not.append({})
        for peer_id, reason in rejected[i].items():
            why_not[-1].setdefault(peer_id, reason)
    if not uncovered:
        return
    parts = [
        f"{_blocks(a, b)} ({_count(b - a, 'block')}: {_summarise(reasons)})"
        for (a, b), reasons in zip(uncovered, why_not, strict=True)
    ]
    raise NoRouteError(
        f"no usable peer serves {', '.join(parts)} of model {model_id!r}",
        uncovered=uncovered,
        transient=all(set(reasons.values()) <= TRANSIENT_REASONS for reasons in why_not),
    )


def _summarise(reasons: Mapping[str, str]) -> str:
    """E.g. ``2 peers banned, 1 peer offline``, or ``no peer announced it``."""
    if not reasons:
        return "no peer announced it"
    counts: dict[str, int] = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{_count(n, 'peer')} {reason}" for reason, n in sorted(counts.items()))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _blocks(start: int, end: int) -> str:
    return f"block {start}" if end - start == 1 else f"blocks {start}-{end - 1}"


def _short_id(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 13 else f"{peer_id[:8]}…{peer_id[-4:]}"
