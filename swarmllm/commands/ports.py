"""Refuse to listen on a TCP port that another process holds.

libp2p binds its listeners with SO_REUSEPORT, so a second daemon on a taken port starts
"successfully" and the kernel splits incoming connections between the two: clients then
reach the wrong node at random. A plain bind (without SO_REUSEPORT) fails on a port in use.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable


class PortInUseError(OSError):
    """A port the command was told to listen on is taken."""

    exit_code = 3  # EXIT_UNREACHABLE: an address problem, like an unreachable swarm


def check_ports_free(maddrs: Iterable[str]) -> None:
    """Raise PortInUseError for the first ``/ip4|ip6/<host>/tcp/<port>`` (port > 0) that a
    plain bind cannot take."""
    from hivemind.utils.multiaddr import Multiaddr

    for text in maddrs:
        protocols = {p.name for p in Multiaddr(text).protocols()}
        if "tcp" not in protocols:
            continue
        port = int(Multiaddr(text).value_for_protocol("tcp"))
        family = "ip6" if "ip6" in protocols else "ip4" if "ip4" in protocols else None
        if port == 0 or family is None:
            continue
        host = Multiaddr(text).value_for_protocol(family)
        kind = socket.AF_INET6 if family == "ip6" else socket.AF_INET
        with socket.socket(kind, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError(
                    f"{text}: TCP port {port} is already in use by another process; choose "
                    "another port (or /tcp/0 for any free one)"
                ) from None
