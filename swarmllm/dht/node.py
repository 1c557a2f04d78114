"""A hivemind DHT node that speaks as our Ed25519 identity, and bounded calls into its process."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hivemind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode

from swarmllm.dht.storage import bound_storage
from swarmllm.security.record_validator import PeerIdSignatureValidator

OWNER_CHECK_PERIOD = 0.5  # seconds between the DHT process's checks that its owner lives


class _OwnedDHT(hivemind.DHT):
    """A DHT whose process ends as soon as the process that started it is gone, and whose
    storage keeps a bounded number of records per key (``swarmllm.dht.storage``).

    hivemind runs the node in a child process that outlives a parent killed with SIGKILL. That
    orphan keeps the peer's identity in the swarm and holds its open streams, so clients of a
    dead peer waited for a timeout instead of seeing the stream drop (and tests leaked it).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._owner_pid = os.getpid()
        super().__init__(*args, **kwargs)

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        super().run_in_background(await_ready=await_ready, timeout=timeout)
        # through the node's command pipe, which it reads once it is ready
        self.run_coroutine(bound_storage)

    def run(self) -> None:  # the child process's body
        threading.Thread(target=self._end_with_owner, daemon=True).start()
        super().run()

    def _end_with_owner(self) -> None:
        while os.getppid() == self._owner_pid:
            time.sleep(OWNER_CHECK_PERIOD)
        os.kill(os.getpid(), signal.SIGKILL)  # the p2p daemon then ends on its own


def swarm_dht(
    identity_path: Path, key: Ed25519PrivateKey, *, nat_port_map: bool = False, **options: Any
) -> hivemind.DHT:
    """A DHT node whose libp2p identity is ``key`` (stored at ``identity_path``), storing only
    records their owners signed; its process ends with ours. ``options`` go to
    ``hivemind.DHT`` as they are.

    ``nat_port_map`` is off unless asked for: hivemind's default (on) makes p2pd send UPnP and
    NAT-PMP discovery to the LAN, which a local swarm or a test must never do.
    """
    return _OwnedDHT(
        identity_path=str(identity_path),
        check_if_identity_free=False,  # hivemind reads the key as RSA here; ours is Ed25519
        record_validators=[PeerIdSignatureValidator(key)],
        nat_port_map=nat_port_map,
        **options,
    )


PROCESS_MARGIN = 2.0  # seconds beyond an operation's own timeout for reaching the DHT's process


def run_bounded(
    dht: hivemind.DHT, operation: Callable[[hivemind.DHT, DHTNode], Awaitable[Any]], timeout: float
) -> Any | None:
    """Run ``operation(dht, node)`` in the DHT's process and return its result, or None (after
    cancelling it) if no answer came within ``timeout`` seconds plus the process margin."""
    future = dht.run_coroutine(operation, return_future=True)
    try:
        return future.result(timeout=timeout + PROCESS_MARGIN)
    except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before 3.11
        future.cancel()
        return None
