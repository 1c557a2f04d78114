"""``swarmllm dht``: a bootstrap node that serves only the DHT, for stable initial peers."""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path

from swarmllm.commands.arguments import add_reachability_flags, multiaddr, peer_multiaddr

DEFAULT_HOST_MADDR = "/ip4/127.0.0.1/tcp/31337"


def add_dht_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("dht", help="run a DHT-only bootstrap node")
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        type=peer_multiaddr,
        default=[],
        help="other bootstrap nodes to join (default: start a new swarm)",
    )
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        type=multiaddr,
        default=[DEFAULT_HOST_MADDR],
        help=f"addresses to listen on (default: {DEFAULT_HOST_MADDR}, this machine only; "
        "for peers on other machines, /ip4/0.0.0.0/tcp/31337 listens on every interface); "
        "a port in use is refused",
    )
    add_reachability_flags(parser)
    parser.add_argument(
        "--identity", type=Path, help="key file (created if missing) that keeps the address stable"
    )
    parser.set_defaults(handler=run_dht)


def run_dht(args: argparse.Namespace) -> None:
    from swarmllm.commands.ports import check_ports_free
    from swarmllm.dht.node import swarm_dht
    from swarmllm.security.identity import load_or_create_identity

    check_ports_free(args.host_maddrs)

    with tempfile.TemporaryDirectory(prefix="swarmllm-dht-") as scratch:
        identity = args.identity or Path(scratch) / "identity.key"
        key = load_or_create_identity(identity)
        dht = swarm_dht(
            identity,
            key,
            initial_peers=args.initial_peers,
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs or None,
            nat_port_map=args.nat_port_map,
            start=True,
        )
        try:
            print("swarmllm DHT node is up; other peers join with:", flush=True)
            for maddr in dht.get_visible_maddrs():
                print(f"  --initial-peers {maddr}", flush=True)
            stop = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            stop.wait()
        finally:
            dht.shutdown()
