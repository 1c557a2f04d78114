"""The ``swarmllm`` command: ``peer``, ``dht``, ``generate``, ``swarm``, ``status``, ``keygen``,
``api``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EXIT_ERROR = 1


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
        add_api_command,
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
        add_api_command,
    ):
        add(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
