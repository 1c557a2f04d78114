"""Spot-checks against peers that sign wrong outputs: ``python scripts/bench_tampering.py``.

The embedded model in two hops, blocks [0, 15) and [15, 30). For each tampering mode of
``tests/tampering_peer.py`` (``none`` is an honest peer) and wire dtype, the first hop's peer
is the only one for its blocks while fresh clients open their sessions, so every route goes
through it; then two honest peers for the same blocks join as verifiers, and each client
generates once with ``--verify-fraction``. Per setting the table gives how many generations
caught the peer (by a random check of a later step, or by the closing check every generation
ends with), how many results equal an honest route's, and the seconds per token. The honest
rows also run clients with verification off: the difference is what checking costs a token.
The JSON lands in ``bench_results/tampering.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import write_report
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
TAMPERING_PEER = ROOT / "tests" / "tampering_peer.py"

from swarmllm.blocks.prompts import prompt_ids  # noqa: E402
from swarmllm.blocks.sources import ModelSource, resolve_model  # noqa: E402
from swarmllm.client.model import DistributedModelForCausalLM  # noqa: E402
from swarmllm.swarm import LocalSwarm  # noqa: E402

MODES = ("none", "noise", "scale", "skip-block")
TEXT = "Name three things a lighthouse keeper does every evening."


def run_setting(
    source: ModelSource, mode: str, wire_dtype: str, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Generations of fresh clients through the first hop's peer of ``mode``."""
    prompt = prompt_ids(source.load_tokenizer(), TEXT)
    split = source.config.num_hidden_layers // 2
    fractions = [args.verify_fraction] * args.clients
    if mode == "none":
        fractions += [0.0] * args.clients  # the same route without checks: the cost's baseline
    with LocalSwarm(0, source=source, workdir=workdir) as swarm, contextlib.ExitStack() as stack:
        launcher = None if mode == "none" else [sys.executable, str(TAMPERING_PEER), mode]
        first = swarm.start_peer(f"first-{mode}", (0, split), launcher=launcher)
        swarm.start_peer("last", (split, source.config.num_hidden_layers))
        swarm.wait_until_ready(timeout=300)
        clients = []
        for fraction in fractions:
            model = stack.enter_context(
                DistributedModelForCausalLM.from_pretrained(
                    None,
                    initial_peers=swarm.initial_peers,
                    verify_fraction=fraction,
                    wire_dtype=wire_dtype,
                )
            )
            session = stack.enter_context(
                model.inference_session(prompt.shape[1] + args.new_tokens)
            )
            assert session.route[0].peer_id == first.peer_id
            clients.append((fraction, model, session))
        for index in range(2):
            swarm.start_peer(f"verifier-{index}", (0, split))
        swarm.wait_until_ready(timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers, wire_dtype=wire_dtype
        ) as honest:
            honest.bans.ban(first.peer_id, "the benchmark's peer under test")
            want = honest.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
        runs = []
        for fraction, model, session in clients:
            started = time.perf_counter()
            got = model.generate(
                prompt, session=session, max_new_tokens=args.new_tokens, eos_token_id=[]
            )
            seconds = time.perf_counter() - started
            steps = [evidence.step for evidence in session.evidence]
            runs.append(
                {
                    "verify_fraction": fraction,
                    "caught": first.peer_id in model.bans.banned(),
                    "caught_at_steps": steps,
                    "equals_honest_route": got.tolist() == want.tolist(),
                    "seconds_per_token": seconds / args.new_tokens,
                }
            )
    return summarise(mode, wire_dtype, runs, args.new_tokens)


def summarise(mode: str, wire_dtype: str, runs: list[dict[str, Any]], steps: int) -> dict:
    checked = [run for run in runs if run["verify_fraction"] > 0]
    unchecked = [run for run in runs if run["verify_fraction"] == 0]
    closing = [run for run in checked if steps in run["caught_at_steps"]]
    row = {
        "mode": mode,
        "wire_dtype": wire_dtype,
        "generations": len(checked),
        "caught": sum(run["caught"] for run in checked),
        "caught_by_closing_check": len(closing),
        "equal_to_honest_route": sum(run["equals_honest_route"] for run in checked),
        "seconds_per_token": statistics.median(run["seconds_per_token"] for run in checked),
        "runs": runs,
    }
    if unchecked:
        baseline = statistics.median(run["seconds_per_token"] for run in unchecked)
        row["seconds_per_token_unchecked"] = baseline
        row["check_cost_ms_per_token"] = 1e3 * (row["seconds_per_token"] - baseline)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--wire-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--clients", type=int, default=4, help="fresh clients per setting")
    parser.add_argument("--verify-fraction", type=float, default=0.05)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "tampering.json")
    args = parser.parse_args()

    source = resolve_model(None)
    workdir = Path(tempfile.mkdtemp(prefix="swarmllm-bench-tampering-"))
    rows = []
    for wire_dtype in args.wire_dtypes:
        for mode in args.modes:
            rows.append(
                run_setting(source, mode, wire_dtype, args, workdir / f"{mode}-{wire_dtype}")
            )
            summary = {k: v for k, v in rows[-1].items() if k != "runs"}
            print(summary, flush=True)

    table = Table(title=f"first hop tampering, verify fraction {args.verify_fraction}")
    columns = ("mode", "wire", "caught", "by the closing check", "= honest route", "s/token")
    for column in (*columns, "check cost"):
        table.add_column(column, justify="right")
    for row in rows:
        cost = row.get("check_cost_ms_per_token")
        table.add_row(
            row["mode"],
            row["wire_dtype"],
            f"{row['caught']}/{row['generations']}",
            str(row["caught_by_closing_check"]),
            f"{row['equal_to_honest_route']}/{row['generations']}",
            f"{row['seconds_per_token']:.3f}",
            "-" if cost is None else f"{cost:+.1f} ms/token",
        )
    Console().print(table)
    write_report(args.out, {"settings": vars(args) | {"out": str(args.out)}, "results": rows})


if __name__ == "__main__":
    main()
