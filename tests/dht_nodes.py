"""Plain hivemind DHT nodes for tests: on loopback, with NAT port mapping off.

hivemind turns UPnP/NAT-PMP discovery on by default, which sends packets to the LAN; every
node a test starts must go through here (or through ``swarm_dht``, which has it off too).
"""

from __future__ import annotations

from typing import Any

import hivemind

LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]


def loopback_dht(**options: Any) -> hivemind.DHT:
    """A started ``hivemind.DHT`` listening on 127.0.0.1 (unless ``host_maddrs`` says otherwise)."""
    options.setdefault("host_maddrs", LOOPBACK_MADDRS)
    return hivemind.DHT(start=True, nat_port_map=False, **options)
