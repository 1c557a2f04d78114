"""The ``swarmllm`` command: ``peer``, ``dht``, ``generate``, ``swarm``, ``status``, ``keygen``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr

EXIT_ERROR = 1


class CommandError(Exception):
    """A problem with the command line or the swarm, reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # every failure the user can act on becomes one clear line
        if args.verbose:
            logging.exception("command failed")
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    from swarmllm.commands import (
        add_dht_command,
        add_generate_command,
        add_keygen_command,
        add_peer_command,
        add_status_command,
        add_swarm_command,
    )

    for add in (
        add_peer_command,
        add_dht_command,
        add_generate_command,
        add_swarm_command,
        add_status_command,
        add_keygen_command,
    ):
        add(commands)
    return parser


def multiaddr(text: str) -> str:
    """argparse type: a multiaddr, checked before any heavy work."""
    try:
        Multiaddr(text)
    except Exception as e:
        raise argparse.ArgumentTypeError(f"invalid multiaddr {text!r}: {e}") from e
    return text


def block_range(text: str) -> tuple[int, int]:
    """argparse type: ``A:B`` with 0 <= A < B."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid block range {text!r}: expected A:B") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"invalid block range {text!r}: need 0 <= A < B")
    return start, end


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_nat_port_map_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nat-port-map",
        action="store_true",
        help="ask the LAN's router for a port mapping (UPnP/NAT-PMP); off by default",
    )


def readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist or is not a file")
    return path


if __name__ == "__main__":
    sys.exit(main())
