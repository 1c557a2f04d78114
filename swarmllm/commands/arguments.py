"""argparse types and flags shared by the subcommands: checked before any heavy work."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def multiaddr(text: str) -> str:
    """argparse type: a multiaddr, checked before any heavy work."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        Multiaddr(text)
    except Exception as e:
        reason = str(e).removeprefix(f"Invalid MultiAddr {text!r}: ")
        raise argparse.ArgumentTypeError(f"invalid multiaddr {text!r}: {reason}") from e
    return text


def peer_multiaddr(text: str) -> str:
    """argparse type: the address of a peer to join through, ending in ``/p2p/<peer id>``."""
    from hivemind.utils.multiaddr import Multiaddr

    text = multiaddr(text)
    if "p2p" not in {protocol.name for protocol in Multiaddr(text).protocols()}:
        raise argparse.ArgumentTypeError(
            f"multiaddr {text!r} lacks /p2p/<peer id>: use the whole address a peer or "
            "`swarmllm dht` printed, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."
        )
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


def add_reachability_flags(parser: argparse.ArgumentParser) -> None:
    """How a node that listens (``dht``, ``peer``) tells others where to reach it."""
    parser.add_argument(
        "--announce-maddrs",
        nargs="*",
        type=multiaddr,
        default=[],
        help="addresses to tell other peers instead (e.g. a public address in front of NAT)",
    )
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


def _number_in(text: str, fits: Callable[[float], bool], expected: str) -> float:
    """``text`` as a float that ``fits``, else an argparse error saying what was ``expected``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not fits(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number within [0, 1]."""
    return _number_in(text, lambda v: 0.0 <= v <= 1.0, "a number within [0, 1]")


def non_negative_float(text: str) -> float:
    """argparse type: seconds, 0 or more."""
    return _number_in(text, lambda v: v >= 0.0, "a number of 0 or more")


def balance_quality(text: str) -> float:
    """argparse type: a quality in (0, 1]."""
    return _number_in(text, lambda v: 0.0 < v <= 1.0, "a number within (0, 1]")


def image_file(text: str) -> Path:
    """argparse type: a picture's path, or the name of an example shipped with swarmllm
    (``green_star.png`` or ``green_star``) from any working directory."""
    from swarmllm.assets import example_image

    path = Path(text)
    if path.is_file():
        return path
    shipped = example_image(text)
    if shipped is not None:
        return shipped
    raise argparse.ArgumentTypeError(f"image file {text!r} does not exist")


def port(text: str) -> int:
    """argparse type: a TCP port number."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port within 0-65535, got {value}")
    return value
