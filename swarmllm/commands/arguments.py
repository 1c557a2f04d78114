"""argparse types and flags shared by the subcommands: checked before any heavy work."""

from __future__ import annotations

import argparse
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr


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
