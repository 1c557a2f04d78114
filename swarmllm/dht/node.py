"""A hivemind DHT node that speaks as our Ed25519 identity, and bounded calls into its process."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hivemind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode

from swarmllm.security.record_validator import PeerIdSignatureValidator


def swarm_dht(identity_path: Path, key: Ed25519PrivateKey, **options: Any) -> hivemind.DHT:
    """A DHT node whose libp2p identity is ``key`` (stored at ``identity_path``), storing only
    records their owners signed. ``options`` go to ``hivemind.DHT`` as they are."""
    return hivemind.DHT(
        identity_path=str(identity_path),
        check_if_identity_free=False,  # hivemind reads the key as RSA here; ours is Ed25519
        record_validators=[PeerIdSignatureValidator(key)],
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
