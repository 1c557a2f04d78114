"""The client against a local swarm of the embedded model, next to transformers in one run.

Measures single-stream decode tokens/s and time to first token for a ~100-token prompt
(swarm vs local ``generate``, interleaved runs, medians), and the stall — the longest gap
between two tokens — when the peer in use is killed with SIGKILL mid-generation and the
client fails over to its replica. Writes bench_results/bench_client.json.

    python scripts/bench_client.py [--runs 3] [--new-tokens 64]
"""

from __future__ import annotations

import os

# As the swarmllm command and bench_swarm.py run (see swarmllm/__init__.py), for both sides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import signal
import statistics
from pathlib import Path

import torch
from bench_common import TokenClock, write_report
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import resolve_model
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

PROMPT = (
    "You are a helpful assistant. Read the following note and summarise it in one paragraph. "
    "The lighthouse on the northern cape was built in 1871 from granite quarried nearby. For "
    "a century its keepers trimmed the wick, wound the clockwork that turned the lens, and "
    "logged every ship that passed. When the light was automated in 1972, the last keeper "
    "stayed on as a caretaker and began to record the seabirds nesting on the cliffs."
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=20, help="tokens before the kill")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_client.json"))
    return parser.parse_args()


class KillAfter(TokenClock):
    """Times tokens and kills a peer once ``n`` tokens were produced."""

    def __init__(self, n: int, kill) -> None:
        super().__init__()
        self.n, self.kill = n, kill

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        if len(self.token_times) == self.n:
            self.kill()


def main() -> None:
    args = parse_args()
    console = Console()
    source = resolve_model()
    tokenizer = source.load_tokenizer()
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # decode exactly --new-tokens

    def run_local() -> TokenClock:
        clock = TokenClock()
        with torch.inference_mode():
            reference.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=tokenizer.pad_token_id,
            )
        return clock

    with LocalSwarm(6, replicas=2, source=source) as swarm:
        swarm.wait_until_ready(timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers, step_timeout=5.0
        ) as model:

            def run_swarm() -> TokenClock:
                clock = TokenClock()
                model.generate(
                    prompt, max_new_tokens=args.new_tokens, eos_token_id=[], streamer=clock
                )
                return clock

            run_local(), run_swarm()  # warm-up
            clocks: dict[str, list[TokenClock]] = {"transformers (local)": [], "swarm": []}
            for index in range(args.runs):
                order = [("transformers (local)", run_local), ("swarm", run_swarm)]
                for name, run in order if index % 2 == 0 else reversed(order):
                    clocks[name].append(run())

            with model.inference_session(prompt.shape[1] + args.new_tokens) as session:
                victim = swarm.peer(session.route[1].peer_id)
                failover_clock = KillAfter(
                    args.kill_after, lambda: victim.send_signal(signal.SIGKILL)
                )
                model.generate(
                    prompt,
                    session=session,
                    max_new_tokens=args.new_tokens,
                    eos_token_id=[],
                    streamer=failover_clock,
                )
                killed_at = failover_clock.token_times[args.kill_after - 1]

    def median(name: str, metric: str) -> float:
        return statistics.median(getattr(clock, metric) for clock in clocks[name])

    local, remote = "transformers (local)", "swarm"
    decode_ratio = median(remote, "decode_tokens_per_second") / median(
        local, "decode_tokens_per_second"
    )
    ttft_ratio = median(remote, "time_to_first_token") / median(local, "time_to_first_token")
    after_kill = failover_clock.token_times[args.kill_after] - killed_at
    report = {
        "model_id": source.model_id,
        "prompt_tokens": prompt.shape[1],
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "decode_tokens_per_second": {n: median(n, "decode_tokens_per_second") for n in clocks},
        "time_to_first_token_s": {n: median(n, "time_to_first_token") for n in clocks},
        "decode_ratio_swarm_over_local": decode_ratio,
        "ttft_ratio_swarm_over_local": ttft_ratio,
        "kill9_failover_stall_s": after_kill,
        "kill9_longest_gap_s": failover_clock.longest_gap,
    }
    write_report(args.out, report)

    table = Table(title=f"{prompt.shape[1]}-token prompt, {args.new_tokens} new tokens, fp32")
    for column in ("engine", "decode tokens/s", "time to first token"):
        table.add_column(column, justify="right")
    for name in clocks:
        table.add_row(
            name,
            f"{median(name, 'decode_tokens_per_second'):.1f}",
            f"{median(name, 'time_to_first_token') * 1000:.0f} ms",
        )
    console.print(table)
    console.print(
        f"decode swarm/local = {decode_ratio:.2f}, first token swarm/local = {ttft_ratio:.2f}"
    )
    console.print(f"kill -9 of the peer in use: {after_kill:.2f} s until the next token")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
