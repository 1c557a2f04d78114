"""Seeded churn for a local swarm: peers killed and started on a schedule while a client
generates, and a report of what the client went through (the churn test and bench_churn).

Peers started by the chaos choose their own blocks, so the swarm heals by rebalancing: a kill
may leave a span without peers until another peer moves there, and the client's failover waits
for that within its budget. The report counts generations completed and correct (equal to the
expected tokens), failovers, the longest stall between two tokens, and each time the coverage
map had a gap, how long it took to close.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from swarmllm.dht.records import CoverageMap
from swarmllm.swarm import LocalSwarm, PeerProcess

COVERAGE_SAMPLE = 0.5  # seconds between reads of the coverage map


@dataclass(frozen=True)
class ChaosEvent:
    at: float  # seconds after the run starts
    # "kill": SIGKILL (no goodbye) to one peer; "kill-span": to every peer of a block, which
    # leaves it uncovered until another peer moves there; "start": a new self-placing peer
    action: str


def chaos_schedule(
    seed: int, kills: int, starts: int, every: float, span_kills: int = 0
) -> list[ChaosEvent]:
    """The events in a seeded random order, about ``every`` seconds apart."""
    rng = random.Random(seed)
    actions = ["kill"] * kills + ["kill-span"] * span_kills + ["start"] * starts
    rng.shuffle(actions)
    events, at = [], 0.0
    for action in actions:
        at += every * rng.uniform(0.75, 1.25)
        events.append(ChaosEvent(round(at, 2), action))
    return events


@dataclass
class Generation:
    started: float  # seconds after the run started
    seconds: float
    tokens: list[int] | None  # None: it failed
    correct: bool
    failovers: int
    longest_stall: float  # the longest wait for one token (the first one included)
    error: str | None = None


@dataclass
class ChurnReport:
    events: list[dict] = field(default_factory=list)  # what the chaos did, and when
    generations: list[Generation] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # seconds each coverage gap lasted
    open_gap: bool = False  # the map still had a gap when the run ended

    @property
    def completed(self) -> int:
        return sum(g.tokens is not None for g in self.generations)

    @property
    def correct(self) -> int:
        return sum(g.correct for g in self.generations)

    @property
    def failovers(self) -> int:
        return sum(g.failovers for g in self.generations)

    @property
    def longest_stall(self) -> float:
        return max((g.longest_stall for g in self.generations), default=0.0)

    def summary(self) -> dict:
        return {
            "generations": len(self.generations),
            "completed": self.completed,
            "correct": self.correct,
            "failovers": self.failovers,
            "longest_stall_s": round(self.longest_stall, 2),
            "coverage_gaps": len(self.gaps) + self.open_gap,
            "longest_recover_s": round(max(self.gaps, default=0.0), 2),
            "gap_still_open": self.open_gap,
        }

    def as_json(self) -> dict:
        return {
            **self.summary(),
            "events": self.events,
            "runs": [dataclasses.asdict(g) for g in self.generations],
        }


class Chaos(threading.Thread):
    """Plays a schedule on ``swarm`` in the background; never takes the swarm below
    ``min_alive`` peers (a kill that would is skipped and logged as such). Half the kills (by
    the seeded coin) hit a peer of the client's current route, so that failover is exercised
    rather than left to chance."""

    def __init__(
        self,
        swarm: LocalSwarm,
        schedule: Sequence[ChaosEvent],
        read: Callable[[], CoverageMap],
        *,
        seed: int,
        peer_args: Sequence[str],
        min_alive: int,
    ):
        super().__init__(name="chaos", daemon=True)
        self.swarm, self.schedule, self.read = swarm, list(schedule), read
        self.peer_args, self.min_alive = list(peer_args), min_alive
        self.rng = random.Random(seed)
        self.killed: set[str] = set()  # ids of the peers killed so far
        self.in_route: set[str] = set()  # the client's current route (run_churn keeps it)
        self.log: list[dict] = []
        self.started_at = time.monotonic()
        self._halt = threading.Event()

    def alive(self) -> list[PeerProcess]:
        return [p for p in self.swarm.peers if p.process.poll() is None]

    def run(self) -> None:
        for index, event in enumerate(self.schedule):
            if self._halt.wait(max(0.0, self.started_at + event.at - time.monotonic())):
                return
            if event.action == "kill":
                self._kill()
            elif event.action == "kill-span":
                self._kill_span()
            else:
                peer = self.swarm.start_peer(f"churn{index}", extra_args=self.peer_args)
                self._note("start", peer.name)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def _kill(self) -> None:
        alive = sorted(self.alive(), key=lambda p: p.name)
        if len(alive) <= self.min_alive:
            self._note("kill skipped", f"only {len(alive)} peers alive")
            return
        in_route = [p for p in alive if p.peer_id in self.in_route]
        victim = self.rng.choice(in_route if in_route and self.rng.random() < 0.5 else alive)
        self._kill_peers("kill", [victim])

    def _kill_span(self) -> None:
        coverage = self.read().without(set(self.killed))
        block = self.rng.randrange(coverage.num_blocks)
        serving = coverage.online(block)
        victims = sorted((p for p in self.alive() if p.peer_id in serving), key=lambda p: p.name)
        if len(self.alive()) - len(victims) < self.min_alive:
            self._note("kill-span skipped", f"block {block}: too few peers would be left")
            return
        self._kill_peers(f"kill-span (block {block})", victims)

    def _kill_peers(self, action: str, victims: list[PeerProcess]) -> None:
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        for victim in victims:
            victim.process.wait(timeout=30)
            self.killed.add(victim.peer_id)
        self._note(action, ", ".join(victim.name for victim in victims))

    def _note(self, action: str, what: str) -> None:
        self.log.append(
            {"at": round(time.monotonic() - self.started_at, 2), "action": action, "peer": what}
        )


class CoverageWatch(threading.Thread):
    """Samples the coverage map (without the killed peers' leftover records) and times each
    gap from the first sample that shows it to the first that shows every block served."""

    def __init__(self, read: Callable[[], CoverageMap], chaos: Chaos):
        super().__init__(name="coverage-watch", daemon=True)
        self.read, self.chaos = read, chaos
        self.gaps: list[float] = []
        self.gap_since: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(COVERAGE_SAMPLE):
            covered = self.read().without(set(self.chaos.killed)).fully_covered
            now = time.monotonic()
            if not covered and self.gap_since is None:
                self.gap_since = now
            elif covered and self.gap_since is not None:
                self.gaps.append(now - self.gap_since)
                self.gap_since = None

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


class _TokenClock:
    """A streamer that times the wait for each new token and tells the chaos the route."""

    def __init__(self, session, chaos: Chaos) -> None:
        self.session, self.chaos = session, chaos
        self.last, self.longest, self.prompt_seen = time.monotonic(), 0.0, False

    def put(self, value: torch.Tensor) -> None:
        now = time.monotonic()
        if self.prompt_seen:  # the first put is the prompt
            self.longest = max(self.longest, now - self.last)
        self.prompt_seen, self.last = True, now
        self.chaos.in_route = {hop.peer_id for hop in self.session.route}

    def end(self) -> None:
        pass


def run_churn(
    model,
    chaos: Chaos,
    prompts: Sequence[torch.Tensor],
    expected: Sequence[list[int]],
    *,
    new_tokens: int,
    max_generations: int,
    timeout: float,
) -> ChurnReport:
    """Generate greedily, one prompt after another, while ``chaos`` plays its schedule, until
    it is done and one more generation has run (at most ``max_generations``, or ``timeout``
    seconds); a generation that fails is recorded and the next one starts."""
    watch = CoverageWatch(chaos.read, chaos)
    report = ChurnReport()
    deadline = time.monotonic() + timeout
    chaos.start()
    watch.start()
    try:
        after_chaos = 0
        while len(report.generations) < max_generations and time.monotonic() < deadline:
            index = len(report.generations) % len(prompts)
            report.generations.append(
                _generate(model, prompts[index], expected[index], new_tokens, chaos)
            )
            after_chaos += not chaos.is_alive()
            if after_chaos >= 2:  # one generation started after the last event
                break
    finally:
        chaos.stop()
        watch.stop()
    report.events, report.gaps = chaos.log, watch.gaps
    report.open_gap = watch.gap_since is not None
    return report


def _generate(
    model, prompt: torch.Tensor, expected: list[int], new_tokens: int, chaos: Chaos
) -> Generation:
    started = time.monotonic()
    since = started - chaos.started_at
    longest, failovers = 0.0, 0
    try:
        with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
            clock = _TokenClock(session, chaos)
            try:
                output = model.generate(
                    prompt,
                    session=session,
                    max_new_tokens=new_tokens,
                    eos_token_id=[],
                    streamer=clock,
                )
            finally:
                failovers, longest = session.failovers, clock.longest
    except Exception as error:  # recorded: the report counts it as not completed
        failed = f"{type(error).__name__}: {error}"
        return Generation(
            since, time.monotonic() - started, None, False, failovers, longest, failed
        )
    tokens = output[0].tolist()
    seconds = time.monotonic() - started
    return Generation(since, seconds, tokens, tokens == expected, failovers, longest)
