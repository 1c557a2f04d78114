"""Generations beside k lying peers: ``python scripts/bench_adversarial.py [--liars 0 2 8]``.

Honest replicas (each serving the whole tiny Llama of ``tests/model_factory.py``, behind an
emulated link of ``--delay-ms`` each way, so that the liars on plain loopback are closer as
well as claiming more) and k liars (``tests/lying_peers.py``: every block announced at 1e9
tokens/s, pings answered, sessions refused or never answered). For each k and mode, fresh
clients (no record of any peer yet: the worst case) each run one greedy generation; the table
gives generations completed, time to first token and decode tokens/s, and the JSON lands in
``bench_results/adversarial.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import TokenClock, write_report
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lying_peers import MODES, Liars  # noqa: E402
from model_factory import save_tiny_model  # noqa: E402

from swarmllm.blocks.sources import resolve_model  # noqa: E402
from swarmllm.client.model import DistributedModelForCausalLM  # noqa: E402
from swarmllm.links import LinkProfile  # noqa: E402
from swarmllm.swarm import LocalSwarm  # noqa: E402


def run_clients(swarm: LocalSwarm, source, clients: int, new_tokens: int, step_timeout: float):
    """One generation per fresh client; each result: completed, ttft_s, tokens_per_s, error."""
    prompt = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for _ in range(clients):
        clock = TokenClock()
        try:
            with DistributedModelForCausalLM.from_pretrained(
                str(source.path), initial_peers=swarm.initial_peers, step_timeout=step_timeout
            ) as model:
                clock.started = time.perf_counter()
                model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
            results.append(
                {
                    "completed": True,
                    "ttft_s": clock.time_to_first_token,
                    "tokens_per_s": clock.decode_tokens_per_second,
                }
            )
        except Exception as e:  # a failed generation is the measurement, not a crash
            results.append({"completed": False, "error": f"{type(e).__name__}: {e}"[:300]})
    return results


def summarise(k: int, mode: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in results if r["completed"]]
    return {
        "liars": k,
        "mode": mode,
        "completed": len(done),
        "clients": len(results),
        "ttft_s": statistics.median(r["ttft_s"] for r in done) if done else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in done) if done else None,
        "errors": [r["error"] for r in results if not r["completed"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--liars", type=int, nargs="+", default=[0, 2, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--honest", type=int, default=2, help="honest replicas")
    parser.add_argument("--clients", type=int, default=2, help="fresh clients per setting")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--step-timeout", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "adversarial.json")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="swarmllm-bench-adversarial-"))
    source = resolve_model(save_tiny_model("llama", workdir / "model"), cache_dir=workdir)
    rows = []
    link = LinkProfile(delay_ms=args.delay_ms)
    with LocalSwarm(
        args.honest, source=source, replicas=args.honest, workdir=workdir / "honest", link=link
    ) as swarm:
        swarm.wait_until_ready(timeout=180)
        num_blocks = source.config.num_hidden_layers
        for k in args.liars:
            for mode in args.modes if k else ["-"]:
                if not k:
                    results = run_clients(
                        swarm, source, args.clients, args.new_tokens, args.step_timeout
                    )
                else:
                    where = workdir / f"liars-{mode}-{k}"
                    with Liars(swarm.initial_peers, source.model_id, num_blocks, k, mode, where):
                        results = run_clients(
                            swarm, source, args.clients, args.new_tokens, args.step_timeout
                        )
                rows.append(summarise(k, mode, results))
                print(rows[-1], flush=True)

    table = Table(title=f"{args.honest} honest replicas ({args.delay_ms:.0f} ms away) + k liars")
    for column in ("liars", "mode", "completed", "time to first token", "tokens/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["liars"]),
            row["mode"],
            f"{row['completed']}/{row['clients']}",
            "-" if row["ttft_s"] is None else f"{row['ttft_s']:.2f} s",
            "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}",
        )
    Console().print(table)
    write_report(args.out, {"settings": vars(args) | {"out": str(args.out)}, "results": rows})


if __name__ == "__main__":
    main()
