"""The ``swarmllm`` command: run, join and use a swarm that serves a language model."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from swarmllm import __version__
from swarmllm.commands.interrupts import interruptible
from swarmllm.commands.parsing import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    Parser,
    exit_code_of,
)


def main(argv: Sequence[str] | None = None) -> int:
    with interruptible():
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            return args.handler(args) or 0
        except KeyboardInterrupt:
            raise
        except Exception as e:  # every failure the user can act on becomes one clear line
            if args.verbose:
                logging.exception("command failed")
            print(f"error: {e}", file=sys.stderr)
            return exit_code_of(e)
    return EXIT_INTERRUPTED  # reached only when interruptible() swallowed a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="swarmllm", description=__doc__, epilog=EXIT_CODES_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("--version", action="version", version=f"swarmllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from swarmllm.commands import (
        add_api_command,
        add_chat_command,
        add_dht_command,
        add_generate_command,
        add_keygen_command,
        add_manifest_command,
        add_peer_command,
        add_status_command,
        add_swarm_command,
    )

    for add in (
        add_peer_command,
        add_dht_command,
        add_generate_command,
        add_chat_command,
        add_swarm_command,
        add_status_command,
        add_keygen_command,
        add_manifest_command,
        add_api_command,
    ):
        add(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
