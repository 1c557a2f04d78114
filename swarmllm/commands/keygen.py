"""``swarmllm keygen FILE``: create a peer identity (an Ed25519 libp2p key, mode 0600)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_keygen_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("keygen", help="create a peer identity file")
    parser.add_argument("file", type=Path, help="where to write the key (must not exist)")
    parser.set_defaults(handler=keygen)


def keygen(args: argparse.Namespace) -> None:
    from swarmllm.security.identity import create_identity, peer_id_of

    key = create_identity(args.file)
    print(f"wrote {args.file}: peer id {peer_id_of(key)}")
