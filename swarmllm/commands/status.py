"""``swarmllm status``: who serves which blocks of a model, and is it fully covered."""

from __future__ import annotations

import argparse
import json
import logging

from swarmllm.commands.arguments import multiaddr


def add_status_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("status", help="show the swarm's coverage of a model")
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument("--initial-peers", nargs="+", type=multiaddr, required=True)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # stderr carries only the answer's errors; -v shows failovers and bans
    parser.set_defaults(handler=status, log_level=logging.ERROR)


def status(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from swarmllm.blocks.sources import resolve_model
    from swarmllm.client.connection import SwarmConnection

    source = resolve_model(args.model)
    num_blocks = source.config.num_hidden_layers
    with SwarmConnection(args.initial_peers) as connection:
        coverage = connection.coverage(source.model_id, num_blocks)
        peers = coverage.peers()
        connection.run(connection.ping_all(list(peers)), timeout=10)
        rows = [
            {
                "peer_id": peer_id,
                "name": record.public_name,
                "blocks": [record.start, record.end],
                "state": record.state.name,
                "decode_steps_per_s": round(record.decode_steps_per_s, 2),
                "cache_tokens_left": record.cache_tokens_left,
                "adapters": list(record.adapters),
                "ping_ms": round(connection.rtt[peer_id] * 1000, 2)
                if peer_id in connection.rtt
                else None,
            }
            for peer_id, record in sorted(peers.items(), key=lambda kv: (kv[1].start, kv[0]))
        ]
    uncovered = [[a, b] for a, b in coverage.uncovered_ranges()]
    if args.json:
        report = {"model_id": source.model_id, "num_blocks": num_blocks, "peers": rows}
        print(json.dumps({**report, "uncovered": uncovered, "fully_covered": not uncovered}))
        return
    table = Table(title=f"{source.model_id}: {num_blocks} blocks")
    for column in ("blocks", "peer", "state", "decode steps/s", "cache left", "ping", "adapters"):
        table.add_column(column)
    for row in rows:
        ping = f"{row['ping_ms']:.1f} ms" if row["ping_ms"] is not None else "unreachable"
        table.add_row(
            f"{row['blocks'][0]}-{row['blocks'][1] - 1}",
            f"{row['name'] or ''} {row['peer_id'][-8:]}",
            row["state"],
            f"{row['decode_steps_per_s']:.1f}",
            str(row["cache_tokens_left"]),
            ping,
            ", ".join(row["adapters"]),
        )
    console = Console()
    console.print(table)
    if uncovered:
        gaps = ", ".join(f"{a}-{b - 1}" for a, b in uncovered)
        console.print(f"[red]not fully covered: no live peer serves blocks {gaps}[/red]")
    else:
        console.print("[green]fully covered[/green]")
