"""A client's handle on the swarm: a DHT node in client mode, its P2P daemon, and an event loop.

The loop runs in a background thread so the synchronous API (``generate``) can drive many
concurrent RPCs; every call into it is bounded by a timeout. The loop only moves bytes: replies
are decoded and checked on the codec threads (``off_loop``), so a large or hostile reply never
stalls the other hops, the pings or the heartbeat of a session.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmllm.dht.coverage import get_coverage
from swarmllm.dht.node import swarm_dht
from swarmllm.dht.records import CoverageMap
from swarmllm.framing import RPCStream
from swarmllm.protocol import Info, InfoReply, decode_reply, stub
from swarmllm.security.identity import load_or_create_identity, peer_id_of

T = TypeVar("T")

PING_TIMEOUT = 3.0
CODEC_THREADS = 2


class SwarmUnreachableError(ConnectionError):
    """None of the initial peers could be reached."""


class SwarmConnectionClosedError(RuntimeError):
    """The connection was shut down; nothing can run on it any more."""


class SwarmConnection:
    def __init__(
        self,
        initial_peers: Sequence[str],
        *,
        identity: str | Path | None = None,
        start_timeout: float = 30.0,
    ):
        """``identity``: a key file (created if missing) to connect as; default: a fresh key."""
        if not initial_peers:
            raise ValueError("no initial peers given: pass the multiaddr a peer printed at start")
        self._scratch = tempfile.TemporaryDirectory(prefix="swarmllm-client-")
        identity_path = Path(identity or Path(self._scratch.name) / "identity.key")
        try:
            key = load_or_create_identity(identity_path)
        except BaseException:
            self._scratch.cleanup()
            raise
        self.peer_id = peer_id_of(key)
        self.dht = swarm_dht(
            identity_path, key, initial_peers=list(initial_peers), client_mode=True, start=False
        )
        try:
            self.dht.run_in_background(await_ready=True, timeout=start_timeout)
        except Exception as e:
            self.dht.shutdown()
            self._scratch.cleanup()
            raise SwarmUnreachableError(
                f"could not join the swarm through {', '.join(initial_peers)}: {e}"
            ) from e
        self.loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.p2p: P2P = self.run(self.dht.replicate_p2p(), timeout=start_timeout)
        self.rtt: dict[str, float] = {}
        self._codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="swarmllm-client-codec")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the connection's loop from any other thread; if the wait ends
        early (a timeout, Ctrl-C), the coroutine is cancelled rather than left running. Raises
        SwarmConnectionClosedError once the connection is shut down (its loop would never run
        the coroutine: the wait would last forever)."""
        if self.closed:
            coro.close()
            raise SwarmConnectionClosedError(
                "the swarm connection is closed (its model was shut down or garbage-collected; "
                "a model owns the connection it is given)"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def coverage(self, model_id: str, num_blocks: int, extra: Sequence[str] = ()) -> CoverageMap:
        return get_coverage(self.dht, model_id, num_blocks, extra_blocks=extra)

    def stub(self, peer_id: str):
        """The peer's RPC interface (``protocol.SwarmRPC``)."""
        return stub(self.p2p, PeerID.from_base58(peer_id))

    async def open_stream(
        self, peer_id: str, method: str, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> RPCStream:
        """A stream to the peer's ``method`` whose replies are read with a bound on each."""
        return await RPCStream.open(self.p2p, peer_id, method, requests)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a codec thread (decoding, checking, verifying a reply)."""
        return await asyncio.get_running_loop().run_in_executor(self._codec, fn, *args)

    async def info(self, peer_id: str, timeout: float = PING_TIMEOUT) -> InfoReply:
        """The peer's ``info`` reply; records the round-trip time as the peer's RTT. Raises
        ``RemoteError`` for an error reply, ``MalformedMessage`` for a malformed one."""
        started = time.perf_counter()
        reply = await self.stub(peer_id).rpc_info(Info().encode(), timeout=timeout)
        self.rtt[peer_id] = time.perf_counter() - started
        return decode_reply(reply, InfoReply, peer_id)

    async def ping_all(self, peer_ids: Sequence[str], timeout: float = PING_TIMEOUT) -> None:
        """Measure RTTs to peers concurrently; unreachable ones get no RTT (routing then
        assumes the default)."""
        await asyncio.gather(*(self.info(p, timeout) for p in peer_ids), return_exceptions=True)

    @property
    def closed(self) -> bool:
        return self._closed or not self._thread.is_alive()

    def shutdown(self) -> None:
        if not self._closed and self.loop.is_running():
            self.run(self.p2p.shutdown(), timeout=5)
            self._closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        self._closed = True
        self._codec.shutdown(wait=False)
        self.dht.shutdown()
        self._scratch.cleanup()

    def __enter__(self) -> SwarmConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
