"""A 3-peer swarm on loopback against local transformers, in one run on the embedded model.

Measures, with interleaved runs and medians (fp32, EOS ignored):
- single-stream decode tokens/s, swarm / local ``generate`` (target >= 0.90);
- time to first token for a 128-token prompt, swarm / local (target <= 1.2);
- aggregate tokens/s of 1, 4 and 8 concurrent sessions (``generate_concurrently``) against
  local ``generate`` of a batch of the same size (target >= 0.8 at 8, and 8 sessions >= 3x one);
- each peer's resident memory / a process holding the full model (target <= 0.45);
- seconds from spawning 3 peers (weights cached, bootstrap node up) to full coverage
  (target <= 10);
- the effect of each wire dtype (activation compression) on logits and greedy tokens.
Prints a table and writes bench_results/bench_swarm.json with the machine and versions.

    python scripts/bench_swarm.py [--runs 3] [--new-tokens 64] [--startups 3] [--profile]
"""

from __future__ import annotations

import os

# The setting the swarmllm command runs peers and clients with (see swarmllm/cli.py), here for
# the local reference too: with spinning OpenMP threads, transformers ran several times slower
# whenever another process was busy on this 2-core machine, which flattered the swarm.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from bench_common import TokenClock, write_report
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import ModelSource, resolve_model
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.protocol import WIRE_DTYPES
from swarmllm.swarm import LocalSwarm

TARGETS = {
    "decode_ratio": (">=", 0.90),
    "ttft_ratio": ("<=", 1.2),
    "concurrent_ratio_at_8": (">=", 0.8),
    "aggregate_8_over_1": (">=", 3.0),
    "peer_rss_ratio": ("<=", 0.45),
    "startup_s": ("<=", 10.0),
}
CHAT = "Write a short story about a lighthouse keeper and a seagull."
LONG_TEXT = (
    "The lighthouse on the northern cape was built in 1871 from granite quarried nearby. For "
    "a century its keepers trimmed the wick, wound the clockwork that turned the lens, and "
    "logged every ship that passed. When the light was automated in 1972, the last keeper "
    "stayed on as a caretaker and began to record the seabirds nesting on the cliffs. "
)
# resident bytes of a process holding the full model, and of one that only imported the same
FULL_MODEL_RSS = """
import sys, psutil, torch
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama
print(psutil.Process().memory_info().rss)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.inference_mode():
    model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)
print(psutil.Process().memory_info().rss)
"""
# resident bytes of a process that imported what a peer imports, before loading any weights
PEER_IMPORTS_RSS = """
import psutil
import swarmllm.cli, swarmllm.peer.server
print(psutil.Process().memory_info().rss)
"""
LOCAL_THREADS = {"local": None, "local 1 thread": 1}  # torch threads (None: torch's default)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each measurement")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--startups", type=int, default=3, help="swarm start-ups to time")
    parser.add_argument("--peer-args", nargs=argparse.REMAINDER, default=[], help="for peers")
    parser.add_argument("--profile", action="store_true", help="print where decode time goes")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_swarm.json"))
    return parser.parse_args()


def interleaved(runs: int, engines: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """``runs`` results of each engine, alternating which one goes first (after a warm-up)."""
    for run in engines.values():
        run()
    results: dict[str, list[Any]] = {name: [] for name in engines}
    for index in range(runs):
        names = list(engines) if index % 2 == 0 else list(reversed(engines))
        for name in names:
            results[name].append(engines[name]())
    return results


def timed_swarm_start(source: ModelSource, peer_args: list[str]) -> tuple[LocalSwarm, float]:
    """A started swarm and the seconds from spawning its peers to full coverage (the
    bootstrap node is up before the clock starts)."""
    swarm = LocalSwarm(3, source=source, peer_args=peer_args)
    try:
        swarm.start()  # returns once the bootstrap listens, with the peers just spawned
        spawned = time.perf_counter()
        swarm.wait_until_ready(timeout=300)
        return swarm, time.perf_counter() - spawned
    except BaseException:
        swarm.stop()
        raise


def rss_of_script(script: str, *args: str) -> list[int]:
    """The numbers a helper script prints: resident bytes at its checkpoints."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return [int(line) for line in result.stdout.split()]


def wire_dtype_effect(
    model: DistributedModelForCausalLM, reference: Any, prompt: torch.Tensor, new_tokens: int
) -> dict[str, dict[str, float]]:
    """Per wire dtype: logits of the prompt through the swarm against local fp32 (max error,
    top-1 agreement), and how many greedy tokens match local ``generate``."""
    with torch.inference_mode():
        expected = reference(prompt).logits
        local_tokens = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
        )[0, prompt.shape[1] :].tolist()
    effect = {}
    chosen = model.wire_dtype
    for dtype in WIRE_DTYPES:
        # the same model (its sessions opened from now on send activations in ``dtype``): a
        # second model on its connection would close it when collected, as models do
        model.wire_dtype = dtype
        try:
            logits = model.forward(prompt)
            tokens = model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
        finally:
            model.wire_dtype = chosen
        tokens = tokens[0, prompt.shape[1] :].tolist()
        same = next(
            (i for i, (a, b) in enumerate(zip(tokens, local_tokens, strict=True)) if a != b), None
        )
        effect[dtype] = {
            "max_abs_logit_error": (logits - expected).abs().max().item(),
            "top1_agreement": (logits.argmax(-1) == expected.argmax(-1)).float().mean().item(),
            "greedy_tokens_identical": len(tokens) if same is None else same,
        }
    return effect


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main() -> None:
    args = parse_args()
    console = Console(width=140)
    source = resolve_model()
    tokenizer = source.load_tokenizer()
    chat = prompt_ids(tokenizer, CHAT)
    long_prompt = tokenizer(LONG_TEXT * 8, return_tensors="pt")["input_ids"][:, :128]
    reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # decode exactly --new-tokens
    pad = tokenizer.pad_token_id

    def local(prompt: torch.Tensor, new_tokens: int, threads: int | None) -> TokenClock:
        clock = TokenClock()
        with torch.inference_mode(), torch_threads(threads):
            reference.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=pad,
            )
        return clock

    def local_batch(n: int, threads: int | None) -> float:
        started = time.perf_counter()
        with torch.inference_mode(), torch_threads(threads):
            reference.generate(
                chat.repeat(n, 1),
                attention_mask=torch.ones_like(chat).repeat(n, 1),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return n * args.new_tokens / (time.perf_counter() - started)

    load_before = os.getloadavg()
    startups = []
    for index in range(args.startups):
        swarm, seconds = timed_swarm_start(source, args.peer_args)
        startups.append(seconds)
        console.print(f"start-up {index + 1}: full coverage {seconds:.1f} s after spawning peers")
        if index < args.startups - 1:
            swarm.stop()

    try:
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers, profile=args.profile
        ) as model:

            def remote(prompt: torch.Tensor, new_tokens: int) -> TokenClock:
                clock = TokenClock()
                model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
                return clock

            def remote_concurrent(n: int) -> float:
                started = time.perf_counter()
                new = args.new_tokens
                model.generate_concurrently([chat] * n, max_new_tokens=new, eos_token_id=[])
                return n * args.new_tokens / (time.perf_counter() - started)

            def engines(
                run_local: Callable[[int | None], Any], run_swarm: Callable[[], Any]
            ) -> dict[str, Callable[[], Any]]:
                """Both local thread settings and the swarm, for ``interleaved``."""
                local_engines = {
                    name: (lambda threads=threads: run_local(threads))
                    for name, threads in LOCAL_THREADS.items()
                }
                return {**local_engines, "swarm": run_swarm}

            decode = interleaved(
                args.runs,
                engines(
                    lambda threads: local(chat, args.new_tokens, threads),
                    lambda: remote(chat, args.new_tokens),
                ),
            )
            if model.profile is not None:
                console.print(model.profile.format())
            first_token = interleaved(
                args.runs,
                engines(
                    lambda threads: local(long_prompt, 1, threads), lambda: remote(long_prompt, 1)
                ),
            )
            concurrent = {
                n: interleaved(
                    args.runs,
                    engines(
                        lambda threads, n=n: local_batch(n, threads),
                        lambda n=n: remote_concurrent(n),
                    ),
                )
                for n in args.concurrency
            }
            wire = wire_dtype_effect(model, reference, chat, args.new_tokens)
            peer_rss = {p.name: psutil.Process(p.pid).memory_info().rss for p in swarm.peers}
            spans = {peer.name: peer.blocks for peer in swarm.peers}
    finally:
        swarm.stop()
    full_imports_rss, full_rss = rss_of_script(FULL_MODEL_RSS, str(source.path))
    (peer_imports_rss,) = rss_of_script(PEER_IMPORTS_RSS)
    load_after = os.getloadavg()

    def medians(results: dict[str, list[float]]) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in results.items()}

    decode_tps = medians({k: [c.decode_tokens_per_second for c in v] for k, v in decode.items()})
    ttft = medians({k: [c.time_to_first_token for c in v] for k, v in first_token.items()})
    aggregate = {n: medians(results) for n, results in concurrent.items()}
    # the baseline is the faster of the local thread settings
    best_decode = max(decode_tps[name] for name in LOCAL_THREADS)
    best_ttft = min(ttft[name] for name in LOCAL_THREADS)
    best_aggregate = {n: max(v[name] for name in LOCAL_THREADS) for n, v in aggregate.items()}
    largest_peer = max(peer_rss.values())
    figures = {
        "decode_ratio": decode_tps["swarm"] / best_decode,
        "ttft_ratio": ttft["swarm"] / best_ttft,
        "peer_rss_ratio": largest_peer / full_rss,
        "startup_s": statistics.median(startups),
    }
    if 8 in aggregate:
        figures["concurrent_ratio_at_8"] = aggregate[8]["swarm"] / best_aggregate[8]
        if 1 in aggregate:
            figures["aggregate_8_over_1"] = aggregate[8]["swarm"] / aggregate[1]["swarm"]
    verdicts = {
        name: value >= TARGETS[name][1] if TARGETS[name][0] == ">=" else value <= TARGETS[name][1]
        for name, value in figures.items()
    }
    report = {
        "model_id": source.model_id,
        "dtype": "float32",
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "chat_prompt_tokens": chat.shape[1],
        "long_prompt_tokens": long_prompt.shape[1],
        "peer_args": args.peer_args,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before_after": [load_before, load_after],
        "decode_tokens_per_second": decode_tps,
        "decode_tokens_per_second_runs": {
            k: [c.decode_tokens_per_second for c in v] for k, v in decode.items()
        },
        "time_to_first_token_s": ttft,
        "time_to_first_token_runs_s": {
            k: [c.time_to_first_token for c in v] for k, v in first_token.items()
        },
        "aggregate_tokens_per_second": aggregate,
        "aggregate_tokens_per_second_runs": concurrent,
        "peer_rss_bytes": peer_rss,
        "peer_spans": spans,
        "peer_imports_rss_bytes": peer_imports_rss,
        "full_model_rss_bytes": full_rss,
        "full_model_imports_rss_bytes": full_imports_rss,
        # the part of memory that scales with the blocks held, imports set aside
        "peer_weights_share": (largest_peer - peer_imports_rss) / (full_rss - full_imports_rss),
        "startup_runs_s": startups,
        "figures": figures,
        "targets": {name: f"{op} {value}" for name, (op, value) in TARGETS.items()},
        "meets_target": verdicts,
        "wire_dtype_effect": wire,
        "profile": model.profile.summary() if model.profile is not None else None,
    }
    write_report(args.out, report)

    table = Table(title=f"3-peer swarm vs local transformers ({source.model_id[:12]}…, fp32)")
    for column in ("measure", *LOCAL_THREADS, "swarm", "swarm/best local", "target", "met"):
        table.add_column(column, justify="right")

    def row(measure: str, values: list[str], ratio: float | None, name: str = "") -> None:
        target = " ".join(map(str, TARGETS[name])) if name else ""
        met = ("yes" if verdicts[name] else "NO") if name in verdicts else ""
        shown = f"{ratio:.2f}" if ratio is not None else ""
        table.add_row(measure, *values, shown, target, met)

    names = [*LOCAL_THREADS, "swarm"]
    row(
        "decode tokens/s",
        [f"{decode_tps[n]:.1f}" for n in names],
        figures["decode_ratio"],
        "decode_ratio",
    )
    row(
        f"first token, {long_prompt.shape[1]}-token prompt",
        [f"{ttft[n] * 1e3:.0f} ms" for n in names],
        figures["ttft_ratio"],
        "ttft_ratio",
    )
    for n, values in aggregate.items():
        row(
            f"{n} concurrent: tokens/s",
            [f"{values[name]:.1f}" for name in names],
            values["swarm"] / best_aggregate[n],
            "concurrent_ratio_at_8" if n == 8 else "",
        )
    if "aggregate_8_over_1" in figures:
        row(
            "8 sessions / 1 (swarm)",
            ["", "", ""],
            figures["aggregate_8_over_1"],
            "aggregate_8_over_1",
        )
    row(
        "resident memory (largest peer)",
        [f"{full_rss / 2**20:.0f} MiB (full)", "", f"{largest_peer / 2**20:.0f} MiB"],
        figures["peer_rss_ratio"],
        "peer_rss_ratio",
    )
    row(
        "  of which imports",
        [f"{full_imports_rss / 2**20:.0f} MiB", "", f"{peer_imports_rss / 2**20:.0f} MiB"],
        report["peer_weights_share"],
    )
    row("start-up to full coverage (s)", ["", "", f"{figures['startup_s']:.1f}"], None, "startup_s")
    console.print(table)
    for dtype, effect in wire.items():
        console.print(
            f"wire {dtype}: max |logit error| {effect['max_abs_logit_error']:.4f}, top-1 "
            f"agreement {effect['top1_agreement']:.3f}, greedy tokens identical for "
            f"{effect['greedy_tokens_identical']} of {args.new_tokens}"
        )
    console.print(
        f"medians of {args.runs} runs; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; written to {args.out}"
    )


if __name__ == "__main__":
    main()
