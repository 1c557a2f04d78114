"""``swarmllm peer``: serve a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from swarmllm.commands.arguments import (
    add_reachability_flags,
    balance_quality,
    block_range,
    multiaddr,
    non_negative_float,
    peer_multiaddr,
    positive_int,
    readable_file,
)

# --flag -> RequestLimits field; unset flags keep RequestLimits' defaults
LIMIT_FLAGS = {
    "max_tokens_per_message": "tokens in one request (default 4096)",
    "max_session_length": "tokens a session may hold (default 8192)",
    "max_message_bytes": "bytes of one request (default 64 MiB)",
    "max_sessions_per_peer": "sessions one client may hold at once (default 8)",
    "max_cache_tokens_per_peer": "cache tokens one client may reserve (default: half the budget)",
    "max_forward_tokens": "rows x tokens of one stateless forward (default 4096)",
    "max_session_lifetime": "seconds a session may stay open (default 3600)",
}


def add_peer_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("peer", help="serve a span of blocks to the swarm")
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        type=peer_multiaddr,
        default=[],
        help="omit to start a new swarm",
    )
    blocks = parser.add_mutually_exclusive_group()
    blocks.add_argument("--blocks", type=block_range, help="serve blocks A:B (A inclusive)")
    blocks.add_argument(
        "--num-blocks", type=positive_int, help="serve K blocks where the swarm needs them most"
    )
    parser.add_argument(
        "--identity", type=Path, help="key file (created with mode 0600 if missing)"
    )
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        type=multiaddr,
        default=["/ip4/0.0.0.0/tcp/0"],
        help="addresses to listen on (tcp/0: any free port); a port in use is refused",
    )
    add_reachability_flags(parser)
    parser.add_argument("--cache-tokens", type=positive_int, default=16384, help="KV cache budget")
    parser.add_argument(
        "--max-sessions", type=positive_int, default=32, help="open sessions at once"
    )
    parser.add_argument("--public-name", default="", help="a name shown in `swarmllm status`")
    parser.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]|mps",
        help="where the span computes (default auto: the first CUDA device, else MPS, else CPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute dtype (default auto: bfloat16 where the device computes it fast, "
        "else float32)",
    )
    parser.add_argument(
        "--quant",
        choices=["none", "int8", "nf4"],
        default="none",
        help="quantize the span's linear layers: int8 on CPU or CUDA, nf4 on CUDA "
        "(CUDA needs bitsandbytes)",
    )
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        metavar="SIZE",
        help="memory for the span's weights and KV caches, e.g. 8GiB; without --blocks or "
        "--num-blocks the peer takes as many blocks as fit (default: half the free RAM, or "
        "90%% of the free VRAM less 1 GiB)",
    )
    parser.add_argument("--session-timeout", type=float, default=300.0, help="idle seconds")
    parser.add_argument(
        "--num-threads", type=positive_int, help="torch threads for prompts (default: all cores)"
    )
    parser.add_argument(
        "--decode-threads", type=positive_int, default=1, help="torch threads for decode steps"
    )
    parser.add_argument(
        "--batch-window",
        type=float,
        metavar="MS",
        help="longest wait of a batch of decode steps for the other active sessions "
        "(default: as long as the last decode pass, at most 50 ms)",
    )
    parser.add_argument(
        "--refresh-period", type=float, default=10.0, help="seconds between DHT announcements"
    )
    balance = parser.add_argument_group(
        "rebalancing", "a peer that chose its own blocks moves where the swarm needs it"
    )
    balance.add_argument(
        "--balance-period",
        type=non_negative_float,
        default=120.0,
        metavar="S",
        help="mean seconds between checks for a better span; 0 never moves (default 120)",
    )
    balance.add_argument(
        "--balance-quality",
        type=balance_quality,
        default=0.75,
        metavar="Q",
        help="move when the swarm's slowest block would get 1/Q times faster (default 0.75)",
    )
    balance.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=60.0,
        metavar="S",
        help="seconds the sessions open at a move may go on with the old blocks (default 60)",
    )
    parser.add_argument(
        "--allowed-peers",
        type=readable_file,
        metavar="FILE",
        help="serve only the clients listed (one peer id per line, '#' comments)",
    )
    parser.add_argument(
        "--no-adapter",
        dest="adapter",
        action="store_false",
        help="with block 0, do not serve the model's vision adapter (served by default)",
    )
    limits = parser.add_argument_group("request limits")
    for name, help_text in LIMIT_FLAGS.items():
        limits.add_argument(f"--{name.replace('_', '-')}", type=positive_int, help=help_text)
    parser.set_defaults(handler=run_peer_command)


def memory_size(text: str) -> int:
    """argparse type: bytes from ``8GiB``, ``512MB``, ``1.5G`` or a number of bytes."""
    from swarmllm.peer.sizing import parse_memory

    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_peer_command(args: argparse.Namespace) -> None:
    from swarmllm.blocks.placement import resolve_placement
    from swarmllm.blocks.sources import resolve_model
    from swarmllm.commands.parsing import UsageError
    from swarmllm.commands.ports import check_ports_free
    from swarmllm.peer.server import PeerSettings, check_blocks, run_peer
    from swarmllm.security.allowlist import load_allowlist
    from swarmllm.security.identity import load_or_create_identity
    from swarmllm.security.validation import RequestLimits

    resolve_placement(args.device, args.dtype, args.quant)  # refuse before loading anything
    if args.identity is not None:
        load_or_create_identity(args.identity)  # fail now on a corrupt or unreadable file
    allowed = load_allowlist(args.allowed_peers) if args.allowed_peers else None
    given = {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}
    check_ports_free(args.host_maddrs)
    source = resolve_model(args.model)
    check_blocks(args.blocks, source)
    num_layers = source.config.num_hidden_layers
    if args.num_blocks is not None and args.num_blocks > num_layers:
        raise UsageError(
            f"--num-blocks {args.num_blocks} exceeds the model's {num_layers} blocks "
            f"(serve at most {num_layers})"
        )
    settings = PeerSettings(
        initial_peers=args.initial_peers,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        identity=args.identity,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        nat_port_map=args.nat_port_map,
        cache_tokens=args.cache_tokens,
        max_sessions=args.max_sessions,
        public_name=args.public_name,
        dtype=args.dtype,
        device=args.device,
        quant=args.quant,
        max_memory=args.max_memory,
        session_timeout=args.session_timeout,
        num_threads=args.num_threads,
        decode_threads=args.decode_threads,
        batch_window=None if args.batch_window is None else args.batch_window / 1e3,
        refresh_period=args.refresh_period,
        limits=dataclasses.replace(RequestLimits(), **given),
        allowed_peers=allowed,
        adapter=args.adapter,
        balance_period=args.balance_period,
        balance_quality=args.balance_quality,
        drain_timeout=args.drain_timeout,
    )
    run_peer(settings, source)
