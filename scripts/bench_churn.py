"""A chaos run on the embedded model: ``python scripts/bench_churn.py [--peers 8] [--seed 1]``.

``--peers`` peers of ``--num-blocks`` blocks each choose their own spans (and rebalance every
``--balance-period`` seconds, sooner when a block loses all its peers); a client generates one
greedy completion after another while a seeded schedule kills ``--kills`` peers (half of them in
the client's route), kills every peer of one block ``--span-kills`` times and starts
``--starts`` new peers, one event every ``--every`` seconds. Peers compute in float32, so that
every generation can be compared token for token with the local model. The table gives
generations completed and correct out of all, failovers, the longest stall between two tokens
and the longest time the coverage map had a gap (how long the swarm took to re-cover a lost
span); the JSON, with every event and generation, lands in ``bench_results/churn.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_common import machine_info, write_report
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import resolve_model
from swarmllm.chaos import Chaos, chaos_schedule, run_churn
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The three laws of thermodynamics say that",
    "A good way to start learning to cook is",
    "The river ran past the old mill and",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--num-blocks", type=int, default=10)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--span-kills", type=int, default=1)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--every", type=float, default=8.0, help="mean seconds between events")
    parser.add_argument("--balance-period", type=float, default=10.0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the chaos run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "churn.json")
    args = parser.parse_args()

    source = resolve_model(None)
    tokenizer = source.load_tokenizer()
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS]
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = [
            local.generate(p, max_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
            for p in prompts
        ]
    del local
    peer_args = ["--num-blocks", str(args.num_blocks), "--dtype", "float32"]
    peer_args += ["--balance-period", str(args.balance_period), "--drain-timeout", "10"]
    peer_args += ["--refresh-period", "3"]
    schedule = chaos_schedule(
        args.seed, args.kills, args.starts, args.every, span_kills=args.span_kills
    )
    num_blocks = source.config.num_hidden_layers
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-churn-") as workdir,
        LocalSwarm(0, source=source, workdir=Path(workdir), peer_args=peer_args) as swarm,
    ):
        for index in range(args.peers):
            swarm.start_peer(f"auto{index}")
        swarm.wait_until_ready(timeout=600)
        ready_s = time.monotonic() - started
        with (
            DistributedModelForCausalLM.from_pretrained(
                None, initial_peers=swarm.initial_peers, step_timeout=10.0
            ) as model,
            SwarmConnection(swarm.initial_peers) as watcher,
        ):
            chaos = Chaos(
                swarm,
                schedule,
                lambda: watcher.coverage(source.model_id, num_blocks),
                seed=args.seed,
                peer_args=peer_args,
                min_alive=max(2, args.peers // 2),
            )
            report = run_churn(
                model,
                chaos,
                prompts,
                expected,
                new_tokens=args.new_tokens,
                max_generations=10_000,
                timeout=args.timeout,
            )
    summary = report.summary()
    table = Table(
        title=f"chaos run: {args.peers} peers x {args.num_blocks} blocks, seed {args.seed}"
    )
    for column in ("completed", "correct", "failovers", "longest stall", "longest re-cover"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{summary['completed']}/{summary['generations']}",
        f"{summary['correct']}/{summary['generations']}",
        str(summary["failovers"]),
        f"{summary['longest_stall_s']:.1f} s",
        f"{summary['longest_recover_s']:.1f} s ({summary['coverage_gaps']} gaps)"
        + (" (one still open)" if summary["gap_still_open"] else ""),
    )
    console = Console()
    console.print(table)
    for event in report.events:
        console.print(f"  {event['at']:7.1f} s  {event['action']}: {event['peer']}")
    write_report(
        args.out,
        {
            "machine": machine_info(),
            "settings": vars(args) | {"out": str(args.out)},
            "swarm_ready_s": round(ready_s, 1),
            **report.as_json(),
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
