"""A local swarm: a bootstrap DHT node and N peer processes on loopback.

Used by ``swarmllm swarm`` for demos and, as a context manager, by the integration tests.
Every process is started and stopped by PID; ``stop`` escalates SIGTERM → SIGKILL after a
bounded wait.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from swarmllm.blocks.sources import ModelSource, resolve_model
from swarmllm.dht.records import CoverageMap, PeerState
from swarmllm.links import EmulatedLink, LinkEmulator, LinkProfile
from swarmllm.security.identity import load_or_create_identity, peer_id_of

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
BOOTSTRAP_TIMEOUT = 60.0


class SwarmStartError(RuntimeError):
    """A process of the swarm died or the swarm did not come up in time."""


@dataclass
class PeerProcess:
    name: str
    peer_id: str
    blocks: tuple[int, int] | None
    process: subprocess.Popen
    log_path: Path
    link: EmulatedLink | None = None  # the emulated link every connection to it crosses

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def send_signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)


def even_spans(num_blocks: int, num_spans: int) -> list[tuple[int, int]]:
    """Split ``[0, num_blocks)`` into ``num_spans`` contiguous spans of near-equal size."""
    if not 1 <= num_spans <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {num_spans} spans")
    bounds = [round(i * num_blocks / num_spans) for i in range(num_spans + 1)]
    return list(itertools.pairwise(bounds))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LocalSwarm:
    def __init__(
        self,
        num_peers: int = 3,
        model: str | None = None,
        *,
        replicas: int = 1,
        workdir: Path | None = None,
        keep_logs: bool = False,
        peer_args: Sequence[str] = (),
        source: ModelSource | None = None,
        link: LinkProfile | None = None,
    ):
        """``workdir`` keeps identities (reused by the next run there) and logs; without it a
        temporary folder does, removed at ``stop`` unless ``keep_logs``. ``link``: put the
        bootstrap node and every peer behind an emulated link (each listens on a private port
        and announces only its link's port), so that every connection, client to peer and peer
        to peer, crosses one link with that delay and bandwidth."""
        if num_peers < 0 or replicas < 1 or num_peers % replicas:
            raise ValueError(f"--peers ({num_peers}) must be a multiple of --replicas ({replicas})")
        self.num_peers, self.replicas, self.peer_args = num_peers, replicas, list(peer_args)
        self.model = model
        self.source = source
        self._remove_workdir = workdir is None and not keep_logs
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="swarmllm-swarm-"))
        self.bootstrap: PeerProcess | None = None
        self.peers: list[PeerProcess] = []
        self.link = link
        self._links = LinkEmulator() if link is not None else None

    @property
    def initial_peers(self) -> list[str]:
        assert self.bootstrap is not None, "the swarm is not started"
        return [self._bootstrap_maddr]

    def start(self) -> LocalSwarm:
        if self.source is None:
            self.source = resolve_model(self.model)  # convert once, before any peer starts
        self._start_bootstrap()
        if not self.num_peers:
            return self  # only the bootstrap node: the caller adds peers with start_peer
        spans = even_spans(self.source.config.num_hidden_layers, self.num_peers // self.replicas)
        for replica in range(self.replicas):
            for index, (start, end) in enumerate(spans):
                self.start_peer(f"peer{index}-{replica}", blocks=(start, end))
        return self

    def start_peer(
        self,
        name: str,
        blocks: tuple[int, int] | None = None,
        extra_args: Sequence[str] = (),
        launcher: Sequence[str] | None = None,
    ) -> PeerProcess:
        """Start one more peer process (``blocks`` None: it chooses its own span).

        ``launcher`` replaces ``python -m swarmllm.cli`` as the command the ``peer`` arguments
        are given to (tests use it to start misbehaving peers).
        """
        identity = self.workdir / f"{name}.key"
        peer_id = peer_id_of(load_or_create_identity(identity))
        args = ["peer", "--initial-peers", *self.initial_peers, "--identity", str(identity)]
        listen, announce, link = self._addresses()
        args += ["--host-maddrs", listen, *(["--announce-maddrs", announce] if link else [])]
        args += ["--public-name", name]
        args += ["--model", self.source.ref] if self.source else []
        if blocks is not None:
            args += ["--blocks", f"{blocks[0]}:{blocks[1]}"]
        args += [*self.peer_args, *extra_args]
        peer = self._spawn(name, peer_id, blocks, args, launcher)
        peer.link = link
        self.peers.append(peer)
        return peer

    def wait_until_ready(
        self,
        timeout: float = 120.0,
        on_progress: Callable[[set[str]], None] | None = None,
        full_coverage: bool = True,
    ) -> CoverageMap:
        """Wait until every started peer is ONLINE in the DHT (and, by default, until every
        block of the model is served). ``on_progress`` gets the ids of the peers online so
        far, about twice a second."""
        from swarmllm.client.connection import SwarmConnection  # the client's DHT reader

        assert self.source is not None
        deadline = time.monotonic() + timeout
        with SwarmConnection(self.initial_peers) as connection:
            ready = 0
            while True:
                self._check_alive()
                try:
                    current = connection.coverage(
                        self.source.model_id, self.source.config.num_hidden_layers
                    )
                except TimeoutError:  # a slow DHT read (a busy machine): not ready yet
                    if time.monotonic() > deadline:
                        raise SwarmStartError(
                            f"only {ready} of {len(self.peers)} peers came online in "
                            f"{timeout:.0f} s (the last DHT read timed out)"
                        ) from None
                    continue
                online = {
                    peer_id
                    for peer_id, record in current.peers().items()
                    if record.state == PeerState.ONLINE
                }
                ready = sum(peer.peer_id in online for peer in self.peers)
                if on_progress is not None:
                    on_progress({peer.peer_id for peer in self.peers} & online)
                if ready == len(self.peers) and (current.fully_covered or not full_coverage):
                    return current
                if time.monotonic() > deadline:
                    raise SwarmStartError(
                        f"only {ready} of {len(self.peers)} peers came online in {timeout:.0f} s"
                    )
                time.sleep(0.5)

    def peer(self, peer_id: str) -> PeerProcess:
        return next(p for p in self.peers if p.peer_id == peer_id)

    def stop(self) -> None:
        """SIGTERM every process we started (peers first), then SIGKILL stragglers."""
        processes = [*self.peers, *([self.bootstrap] if self.bootstrap else [])]
        for proc in processes:
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in processes:
            try:
                proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(timeout=5)
        self.peers, self.bootstrap = [], None
        if self._links is not None:
            self._links.close()
            self._links = None
        if self._remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_bootstrap(self) -> None:
        identity = self.workdir / "bootstrap.key"
        peer_id = peer_id_of(load_or_create_identity(identity))
        listen, announce, link = self._addresses(free_port())
        self._bootstrap_maddr = f"{announce}/p2p/{peer_id}"
        args = ["dht", "--identity", str(identity), "--host-maddrs", listen]
        args += ["--announce-maddrs", announce] if link else []
        self.bootstrap = self._spawn("bootstrap", peer_id, None, args)
        self.bootstrap.link = link
        self._wait_for_port(int(listen.rsplit("/", 1)[1]), BOOTSTRAP_TIMEOUT)

    def _addresses(self, port: int = 0) -> tuple[str, str, EmulatedLink | None]:
        """A node's listen and announced multiaddrs, and the link between them if any (port 0:
        any free port; a link needs to know the port it forwards to, so it picks one)."""
        if self._links is None:
            listen = f"/ip4/{HOST}/tcp/{port}"
            return listen, listen, None
        port = port or free_port()
        link = self._links.add(port, self.link)  # type: ignore[arg-type]  # set with _links
        return f"/ip4/{HOST}/tcp/{port}", f"/ip4/{HOST}/tcp/{link.port}", link

    def _wait_for_port(self, port: int, timeout: float) -> None:
        """Peers can only join once the bootstrap node listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((HOST, port)) == 0:
                    return
            time.sleep(0.2)
        raise SwarmStartError(f"the bootstrap node did not listen on port {port} in {timeout} s")

    def _spawn(
        self,
        name: str,
        peer_id: str,
        blocks: tuple[int, int] | None,
        args: list[str],
        launcher: Sequence[str] | None = None,
    ) -> PeerProcess:
        log_path = self.workdir / f"{name}.log"
        command = [*(launcher or [sys.executable, "-m", "swarmllm.cli"]), *args]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return PeerProcess(name, peer_id, blocks, process, log_path)

    def _check_alive(self) -> None:
        for proc in [self.bootstrap, *self.peers]:
            if proc is not None and proc.process.poll() is not None:
                raise SwarmStartError(
                    f"{proc.name} exited with code {proc.process.returncode}:\n{proc.log_tail()}"
                )
