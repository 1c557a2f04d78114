"""``swarmllm status``: who serves which blocks of a model, and is it fully covered."""

from __future__ import annotations

import argparse
import json
import logging

from swarmllm.commands.arguments import peer_multiaddr
from swarmllm.commands.parsing import EXIT_NOT_SERVED

UNREACHABLE = "UNREACHABLE"  # announced, but did not answer a ping: likely gone


def add_status_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "status",
        help="show the swarm's coverage of a model",
        description="Who serves which blocks. Peers that do not answer a ping are shown as "
        f"{UNREACHABLE} and cover nothing; exits {EXIT_NOT_SERVED} unless every block has a "
        "live peer.",
    )
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        type=peer_multiaddr,
        required=True,
        metavar="MADDR",
        help="a multiaddr ending in /p2p/<peer id>",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # stderr carries only the answer's errors; -v shows failovers and bans
    parser.set_defaults(handler=status, log_level=logging.ERROR)


def status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from swarmllm.blocks.sources import resolve_model
    from swarmllm.client.connection import SwarmConnection
    from swarmllm.dht.records import CoverageMap

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
                "state": record.state.name if peer_id in connection.rtt else UNREACHABLE,
                "decode_steps_per_s": round(record.decode_steps_per_s, 2),
                "cache_tokens_left": record.cache_tokens_left,
                "adapters": list(record.adapters),
                "device": record.device,
                "dtype": record.dtype,
                "quant": record.quant,
                "ping_ms": round(connection.rtt[peer_id] * 1000, 2)
                if peer_id in connection.rtt
                else None,
            }
            for peer_id, record in sorted(peers.items(), key=lambda kv: (kv[1].start, kv[0]))
        ]
        reachable = CoverageMap(
            coverage.model_id,
            num_blocks,
            [{p: r for p, r in block.items() if p in connection.rtt} for block in coverage.blocks],
        )
    uncovered = [[a, b] for a, b in reachable.uncovered_ranges()]
    code = EXIT_NOT_SERVED if uncovered else 0
    if args.json:
        report = {"model_id": source.model_id, "num_blocks": num_blocks, "peers": rows}
        print(json.dumps({**report, "uncovered": uncovered, "fully_covered": not uncovered}))
        return code
    table = Table(title=f"{source.model_id}: {num_blocks} blocks")
    columns = ("blocks", "peer", "state", "device", "precision", "decode steps/s", "cache left")
    for column in (*columns, "ping", "adapters"):
        table.add_column(column)
    for row in rows:
        ping = f"{row['ping_ms']:.1f} ms" if row["ping_ms"] is not None else "unreachable"
        table.add_row(
            f"{row['blocks'][0]}-{row['blocks'][1] - 1}",
            f"{row['name'] or ''} {row['peer_id'][-8:]}",
            row["state"],
            row["device"],
            row["dtype"] if row["quant"] == "none" else f"{row['quant']} ({row['dtype']})",
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
    return code
