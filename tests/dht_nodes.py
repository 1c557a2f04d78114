"""Plain hivemind DHT nodes for tests: on loopback, with NAT port mapping off.

hivemind turns UPnP/NAT-PMP discovery on by default, which sends packets to the LAN; every
node a test starts must go through here (or through ``swarm_dht``, which has it off too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hivemind

from swarmllm.dht.node import swarm_dht
from swarmllm.security.identity import load_or_create_identity

LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]


def loopback_dht(**options: Any) -> hivemind.DHT:
    """A started ``hivemind.DHT`` listening on 127.0.0.1 (unless ``host_maddrs`` says otherwise)."""
    options.setdefault("host_maddrs", LOOPBACK_MADDRS)
    return hivemind.DHT(start=True, nat_port_map=False, **options)


def swarm_node(folder: Path, name: str, initial_peers: list[str], **options: Any) -> hivemind.DHT:
    """A started node as peers run it (``swarm_dht``: record validator, bounded storage), on
    127.0.0.1, with its identity kept in ``folder/name.key``."""
    path = folder / f"{name}.key"
    return swarm_dht(
        path,
        load_or_create_identity(path),
        initial_peers=initial_peers,
        host_maddrs=LOOPBACK_MADDRS,
        start=True,
        **options,
    )
