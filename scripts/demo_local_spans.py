"""Answer a chat prompt with a model cut into spans that are chained in this one process.

python scripts/demo_local_spans.py                       # the embedded SmolLM2-135M
python scripts/demo_local_spans.py --model DIR_OR_HUB_ID --spans 4 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from swarmllm.blocks.local_chain import LocalChain
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import resolve_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local directory (default: the embedded model)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--spans", type=int, default=3, help="how many spans to cut the model into")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    console = Console()

    started = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    chain = LocalChain.load(source, num_spans=args.spans)
    loaded = time.perf_counter() - started
    console.print(f"loaded {source.model_id} as {args.spans} spans in {loaded:.1f} s")

    prompt = prompt_ids(tokenizer, args.prompt)
    started = time.perf_counter()
    tokens, span_seconds = chain.generate_greedy(
        prompt, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id
    )
    elapsed = time.perf_counter() - started

    console.print(f"[bold]user:[/bold] {escape(args.prompt)}")
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    console.print(f"[bold]assistant:[/bold] {escape(answer)}")

    # one forward pass per new token: the first is the prefill of the whole prompt
    speed = len(tokens) / elapsed
    table = Table(title=f"{len(tokens)} tokens in {elapsed:.2f} s ({speed:.1f} tokens/s)")
    for column in ("span", "blocks", "total ms", "ms / token", "share"):
        table.add_column(column, justify="right")
    for index, (span, seconds) in enumerate(zip(chain.spans, span_seconds, strict=True)):
        table.add_row(
            str(index),
            f"[{span.start}, {span.end})",
            f"{seconds * 1e3:.1f}",
            f"{seconds * 1e3 / len(tokens):.2f}",
            f"{seconds / elapsed:.0%}",
        )
    head_seconds = elapsed - sum(span_seconds)
    table.add_row(
        "head",
        "embed + lm head",
        f"{head_seconds * 1e3:.1f}",
        f"{head_seconds * 1e3 / len(tokens):.2f}",
        f"{head_seconds / elapsed:.0%}",
    )
    console.print(table)


if __name__ == "__main__":
    main()
