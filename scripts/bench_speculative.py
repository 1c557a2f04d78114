"""Speculative decoding against plain decoding through a local 3-peer swarm.

On the embedded model (fp32, greedy, EOS ignored), for each one-way link delay (``LocalSwarm``
behind emulated links; 0 is plain loopback): tokens/s and rounds (steps through the swarm) of
``--speculative off``, ``lookup`` and, with ``--draft-model REF``, ``draft`` on a copy-heavy task
(rewrite a given paragraph) and on free text, and whether the tokens are identical to plain
decoding's. Prints a table and writes bench_results/bench_speculative.json with the machine,
versions and load average.

    python scripts/bench_speculative.py [--delays 0 25] [--new-tokens 96] [--draft-model REF]

``--draft-model embedded`` drafts with the swarm's own model: every draft is accepted, which
shows what the mechanism gives at best and what the draft model's local passes cost.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the swarmllm command runs (cli.py)

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import write_report
from rich.console import Console
from rich.table import Table

from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import resolve_model
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.links import LinkProfile
from swarmllm.swarm import LocalSwarm

PARAGRAPH = (
    "The lighthouse on the northern cape was built in 1871 from granite quarried nearby. For a "
    "century its keepers trimmed the wick, wound the clockwork that turned the lens, and logged "
    "every ship that passed. In 1972 the light was automated, and the last keeper moved to the "
    "village, where he still tells visitors about the storms of his first winter."
)
TASKS = {
    "copy-heavy": f"Rewrite the following paragraph, keeping every sentence:\n\n{PARAGRAPH}",
    "free text": "Write a short story about a lighthouse keeper and a seagull.",
}
MODES = ("off", "lookup")  # and "draft" with a --draft-model


def run_one(model: DistributedModelForCausalLM, prompt: torch.Tensor, mode: str, new_tokens: int):
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        started = time.perf_counter()
        output = model.generate(
            prompt, session=session, max_new_tokens=new_tokens, eos_token_id=[], speculative=mode
        )
        seconds = time.perf_counter() - started
        stats = session.speculation
    tokens = output[0, prompt.shape[1] :].tolist()
    return tokens, {
        "tokens": len(tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(len(tokens) / seconds, 2),
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
    }


def bench_delay(
    source, delay_ms: float, new_tokens: int, draft_model: str | None
) -> list[dict[str, Any]]:
    link = LinkProfile(delay_ms=delay_ms) if delay_ms else None
    modes = (*MODES, "draft") if draft_model else MODES
    rows = []
    with LocalSwarm(3, source=source, link=link) as swarm:
        swarm.wait_until_ready(timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers, step_timeout=60.0, draft_model=draft_model
        ) as model:
            tokenizer = model.tokenizer
            run_one(model, prompt_ids(tokenizer, "Hi", chat=True), "lookup", 4)  # warm up
            for task, text in TASKS.items():
                prompt = prompt_ids(tokenizer, text, chat=True)
                results = {mode: run_one(model, prompt, mode, new_tokens) for mode in modes}
                base = results["off"][1]["tokens_per_s"]
                for mode in modes:
                    row = {"delay_ms": delay_ms, "task": task, "mode": mode, **results[mode][1]}
                    row["speedup"] = round(row["tokens_per_s"] / base, 2)
                    row["identical_tokens"] = results[mode][0] == results["off"][0]
                    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 25.0], metavar="MS")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-model", metavar="REF", help="also measure --speculative draft")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_speculative.json"))
    args = parser.parse_args()
    source = resolve_model()
    load_before = os.getloadavg()
    rows = [
        row
        for delay in args.delays
        for row in bench_delay(source, delay, args.new_tokens, args.draft_model)
    ]
    load_after = os.getloadavg()

    table = Table(title=f"speculative decoding, {source.name}, 3 peers, {args.new_tokens} tokens")
    for column in ("one-way delay", "task", "mode", "tokens/s", "rounds", "accepted/drafted"):
        table.add_column(column)
    table.add_column("speedup")
    table.add_column("identical")
    for row in rows:
        table.add_row(
            f"{row['delay_ms']:g} ms",
            row["task"],
            row["mode"],
            f"{row['tokens_per_s']:.2f}",
            str(row["rounds"]),
            f"{row['accepted']}/{row['drafted']}",
            f"{row['speedup']:.2f}x",
            "yes" if row["identical_tokens"] else "NO",
        )
    console = Console(width=120)
    console.print(table)
    console.print(f"load average (1/5/15 min): before {load_before}, after {load_after}")
    write_report(
        args.out,
        {
            "model": source.name,
            "new_tokens": args.new_tokens,
            "draft_model": args.draft_model,
            "rows": rows,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
