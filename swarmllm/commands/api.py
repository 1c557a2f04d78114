"""``swarmllm api``: an OpenAI-compatible HTTP server, web chat and dashboard for a swarm."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from swarmllm.commands.arguments import multiaddr, port, positive_int
from swarmllm.commands.client_options import (
    add_draft_model_option,
    add_speculative_option,
    speculative_mode,
)

# a server steps many requests together: peers batch single-token steps across sessions, but
# run a step with drafts alone, so drafting is for servers of few, latency-bound users
DEFAULT_SERVER_SPECULATIVE = "off"

API_KEYS_ENV = "SWARMLLM_API_KEYS"  # comma-separated, for keys that should not sit in `ps`


def add_api_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "api", help="serve the OpenAI API, a web chat and a swarm dashboard over HTTP"
    )
    parser.add_argument("--initial-peers", nargs="+", type=multiaddr, required=True)
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    add_server_arguments(parser)
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per step before failover"
    )
    parser.set_defaults(handler=run_api, log_level=logging.WARNING)


def add_server_arguments(parser: argparse.ArgumentParser, port_flag: str = "--port") -> None:
    """``--host``, the port flag, ``--api-key``: shared with ``swarmllm swarm --api-port``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    if port_flag == "--port":
        parser.add_argument("--port", type=port, default=8000, help="TCP port to listen on")
    else:
        parser.add_argument(port_flag, type=port, help="also serve the API on this TCP port")
    parser.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=8,
        metavar="N",
        help="requests generated together, the rest queue (default 8: peers hold at most "
        "--max-sessions-per-peer sessions of one client, 8 by default)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accept only requests with 'Authorization: Bearer KEY' (repeatable; also "
        f"${API_KEYS_ENV}, comma-separated); default: no key needed",
    )
    add_speculative_option(parser, DEFAULT_SERVER_SPECULATIVE)
    add_draft_model_option(parser)


def api_keys(flags: Sequence[str]) -> list[str]:
    from_env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    keys = [*flags, *from_env]
    if any(not k.strip() for k in keys):
        raise ValueError("--api-key must not be empty")
    return keys


def run_api(args: argparse.Namespace) -> None:
    serve_swarm(
        args.model,
        args.initial_peers,
        args.host,
        args.port,
        api_keys(args.api_key),
        step_timeout=args.timeout,
        speculative=speculative_mode(args),
        draft_model=args.draft_model,
    )


def serve_swarm(
    model_ref: str | None,
    initial_peers: Sequence[str],
    host: str,
    port: int,
    keys: Sequence[str],
    max_active: int = 8,
    step_timeout: float = 10.0,
    speculative: str = DEFAULT_SERVER_SPECULATIVE,
    draft_model: str | None = None,
) -> None:
    """Join the swarm as a client and serve HTTP until SIGINT/SIGTERM."""
    from swarmllm.api.server import serve
    from swarmllm.client.model import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(
        model_ref, initial_peers=initial_peers, step_timeout=step_timeout, draft_model=draft_model
    ) as model:
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        print(
            f"swarmllm api: {model.source.name} on http://{shown}:{port}/ (OpenAI API at /v1)",
            flush=True,
        )
        serve(model, host, port, keys, max_active, speculative)
