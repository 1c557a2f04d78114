"""Tokens/s of the in-process span chain against transformers' ``generate`` on the same model.

Same prompt, dtype (fp32) and number of new tokens (EOS ignored), one warm-up each, then
interleaved timed runs; the medians are compared. Writes bench_results/bench_spans.json.

    python scripts/bench_spans.py [--model REF] [--new-tokens 64] [--runs 5] [--spans 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import write_report
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, GenerationConfig

from swarmllm.blocks.local_chain import LocalChain
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import resolve_model

TARGET_RATIO = 0.95


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local directory (default: the embedded model)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (at least 3)")
    parser.add_argument("--spans", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_spans.json"))
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    return args


def timed(run: Callable[[], list[int]]) -> tuple[float, list[int]]:
    started = time.perf_counter()
    tokens = run()
    return time.perf_counter() - started, tokens


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    prompt = prompt_ids(tokenizer, args.prompt)

    reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    chain = LocalChain.load(source, num_spans=args.spans, dtype=torch.float32)
    # Decode exactly --new-tokens tokens on both sides: generate() fills an unset EOS in the
    # config it is given from the model's own generation config, so clear it there.
    reference.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id
    )

    @torch.inference_mode()
    def run_transformers() -> list[int]:
        mask = torch.ones_like(prompt)
        output = reference.generate(prompt, attention_mask=mask, generation_config=config)
        return output[0, prompt.shape[1] :].tolist()

    def run_chain() -> list[int]:
        return chain.generate_greedy(prompt, args.new_tokens)[0]

    engines = {"transformers generate": run_transformers, f"{args.spans}-span chain": run_chain}
    outputs = {name: timed(run)[1] for name, run in engines.items()}  # warm-up
    for name, tokens in outputs.items():
        if len(tokens) != args.new_tokens:
            raise RuntimeError(f"{name} produced {len(tokens)} tokens, not {args.new_tokens}")
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for index in range(args.runs):  # interleaved, alternating which goes first
        order = list(engines) if index % 2 == 0 else list(reversed(engines))
        for name in order:
            seconds[name].append(timed(engines[name])[0])

    speeds = {name: args.new_tokens / statistics.median(s) for name, s in seconds.items()}
    names = list(engines)
    reference_speed, chain_speed = (speeds[name] for name in names)
    ratio = chain_speed / reference_speed
    report = {
        "model_id": source.model_id,
        "dtype": "float32",
        "prompt_tokens": prompt.shape[1],
        "new_tokens": args.new_tokens,
        "spans": [[span.start, span.end] for span in chain.spans],
        "same_tokens": len(set(map(tuple, outputs.values()))) == 1,
        "seconds": seconds,
        "tokens_per_second": speeds,
        "ratio": ratio,
        # the fastest runs are the least disturbed by other processes on a shared machine
        "ratio_of_fastest": min(seconds[names[0]]) / min(seconds[names[1]]),
        "target_ratio": TARGET_RATIO,
    }
    write_report(args.out, report)

    table = Table(title=f"{args.new_tokens} new tokens, {prompt.shape[1]}-token prompt, fp32")
    for column in ("engine", "median s", "min s", "max s", "tokens/s"):
        table.add_column(column, justify="right")
    for name, runs in seconds.items():
        table.add_row(
            name,
            f"{statistics.median(runs):.3f}",
            f"{min(runs):.3f}",
            f"{max(runs):.3f}",
            f"{speeds[name]:.1f}",
        )
    console.print(table)
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    console.print(f"chain / transformers = {ratio:.3f} ({verdict} the {TARGET_RATIO} target)")
    console.print(f"same tokens: {report['same_tokens']}; written to {args.out}")


if __name__ == "__main__":
    main()
