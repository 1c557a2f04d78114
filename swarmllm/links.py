"""Emulated network links for local swarms: TCP forwarders on loopback that delay traffic.

A node of a local swarm listens on a private port and announces only its link's port, so every
connection to it crosses the link. Each direction of a connection is delayed by the link's
one-way delay (plus optional jitter), and with a bandwidth cap each chunk also waits for the
link to finish sending the chunks before it. Order within a direction is kept, as on TCP.
No kernel support is needed (netem is absent on many machines).
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class LinkProfile:
    """One-way delay and jitter in milliseconds, and an optional cap in megabits per second."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    mbps: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("link delay and jitter must be >= 0 ms")
        if self.mbps is not None and self.mbps <= 0:
            raise ValueError("link bandwidth must be > 0 Mbit/s")

    @property
    def emulates_anything(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.mbps is not None


@dataclass
class LinkCounters:
    """Bytes that crossed a link towards its node (``inbound``) and back (``outbound``)."""

    connections: int = 0
    inbound: int = 0
    outbound: int = 0


@dataclass
class EmulatedLink:
    """Traffic to ``port`` reaches the node listening on ``target_port`` after the delay."""

    port: int
    target_port: int
    profile: LinkProfile
    counters: LinkCounters = field(default_factory=LinkCounters)


class _Direction:
    """One direction of one connection: chunks are released in order at their due time."""

    def __init__(self, profile: LinkProfile, rng: random.Random):
        self.profile, self.rng = profile, rng
        self._last_due = 0.0  # keeps order when jitter would reorder chunks
        self._sent_until = 0.0  # when the capped link has finished the previous chunks

    def due_time(self, now: float, size: int) -> float:
        sent = now
        if self.profile.mbps is not None:
            sent = max(now, self._sent_until) + size * 8 / (self.profile.mbps * 1e6)
            self._sent_until = sent
        jitter = self.rng.uniform(-self.profile.jitter_ms, self.profile.jitter_ms)
        delay = max(0.0, self.profile.delay_ms + jitter) / 1e3
        self._last_due = max(self._last_due, sent + delay)
        return self._last_due


class LinkEmulator:
    """Runs emulated links on a background event loop until ``close``."""

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._servers: list[asyncio.base_events.Server] = []
        self.links: list[EmulatedLink] = []

    def add(self, target_port: int, profile: LinkProfile) -> EmulatedLink:
        """A new link in front of ``target_port``; returns it with the port to announce."""
        future = asyncio.run_coroutine_threadsafe(self._listen(target_port, profile), self._loop)
        link = future.result(timeout=START_TIMEOUT)
        self.links.append(link)
        return link

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=START_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=START_TIMEOUT)

    def __enter__(self) -> LinkEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _listen(self, target_port: int, profile: LinkProfile) -> EmulatedLink:
        link: EmulatedLink | None = None

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert link is not None
            await self._forward_connection(link, reader, writer)

        server = await asyncio.start_server(accept, HOST, 0)
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        link = EmulatedLink(port, target_port, profile)
        return link

    async def _forward_connection(
        self,
        link: EmulatedLink,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        link.counters.connections += 1
        try:
            node_reader, node_writer = await asyncio.open_connection(HOST, link.target_port)
        except OSError:
            client_writer.close()
            return
        pipes = [
            asyncio.create_task(self._pipe(client_reader, node_writer, link, inbound=True)),
            asyncio.create_task(self._pipe(node_reader, client_writer, link, inbound=False)),
        ]
        # both sides closing in turn ends both pipes; a reset on either side ends the other too
        done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        for task in done:
            task.exception()  # a reset is how a link sees a node go away: not an error here
        for writer in (client_writer, node_writer):
            writer.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: EmulatedLink,
        inbound: bool,
    ) -> None:
        """Copy ``reader`` to ``writer``, each chunk delivered at its due time, in order."""
        loop = asyncio.get_running_loop()
        direction = _Direction(link.profile, self._rng)
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:  # the sender closed its side
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                chunk = await reader.read(CHUNK_BYTES)
                if inbound:
                    link.counters.inbound += len(chunk)
                else:
                    link.counters.outbound += len(chunk)
                queue.put_nowait((direction.due_time(loop.time(), len(chunk)), chunk))
                if not chunk:
                    break
            await delivering
        finally:
            delivering.cancel()
