"""``swarmllm api`` against the library on the same 3-peer swarm of the embedded model.

Measures, with interleaved runs and medians (fp32, greedy, the same prompt and token count):
- time to first token and decode tokens/s of one streamed chat request through the API
  (HTTP, SSE, the server's scheduler) against ``model.generate`` with a streamer, which is what
  ``swarmllm generate`` runs once it has joined the swarm;
- aggregate tokens/s of 8 concurrent streamed requests through the API against
  ``model.generate_concurrently`` of the same 8 prompts.
Prints a table and writes bench_results/bench_api.json with the machine and versions.

    python scripts/bench_api.py [--runs 3] [--new-tokens 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the swarmllm command runs

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
from bench_common import TokenClock, write_report
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from api_server import api_server

from swarmllm.blocks.prompts import prompt_ids
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

PROMPT = "Write a long essay about rivers, their sources, their deltas and the towns on them."
CONCURRENT = 8
MODEL = "SmolLM2-135M-Instruct"


def api_stream(base: str, prompt: str, new_tokens: int) -> dict[str, float]:
    """One streamed chat request: seconds to the first content chunk, then tokens/s."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times, tokens = [], 0
    started = time.perf_counter()
    with (
        httpx.Client(timeout=300) as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=body) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {
        "ttft_s": times[0] - started,
        "decode_tokens_per_s": (tokens - 1) / (times[-1] - times[0]),
        "tokens": tokens,
        "elapsed_s": times[-1] - started,
    }


def library_stream(model: DistributedModelForCausalLM, ids, new_tokens: int) -> dict[str, float]:
    clock = TokenClock()
    output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return {
        "ttft_s": clock.time_to_first_token,
        "decode_tokens_per_s": clock.decode_tokens_per_second,
        "tokens": output.shape[1] - ids.shape[1],
        "elapsed_s": clock.token_times[-1] - clock.started,
    }


def prompts_for(n: int) -> list[str]:
    return [f"{PROMPT} Essay number {i + 1}." for i in range(n)]


def api_concurrent(base: str, new_tokens: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        runs = list(pool.map(lambda p: api_stream(base, p, new_tokens), prompts_for(CONCURRENT)))
    return sum(r["tokens"] for r in runs) / (time.perf_counter() - started)


def library_concurrent(model: DistributedModelForCausalLM, new_tokens: int) -> float:
    prompts = [prompt_ids(model.tokenizer, p) for p in prompts_for(CONCURRENT)]
    started = time.perf_counter()
    outputs = model.generate_concurrently(prompts, max_new_tokens=new_tokens, do_sample=False)
    tokens = sum(o.shape[1] - p.shape[1] for o, p in zip(outputs, prompts, strict=True))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_api.json"))
    args = parser.parse_args()
    results: dict[str, list] = {k: [] for k in ("api", "library", "api_8", "library_8")}
    with LocalSwarm(3) as swarm:
        swarm.wait_until_ready(timeout=300)
        with (
            api_server(swarm.initial_peers, swarm.workdir / "api.log") as base,
            DistributedModelForCausalLM.from_pretrained(
                None, initial_peers=swarm.initial_peers
            ) as model,
        ):
            ids = prompt_ids(model.tokenizer, PROMPT)
            api_stream(base, PROMPT, 4)  # warm both paths up
            library_stream(model, ids, 4)
            for _ in range(args.runs):
                results["api"].append(api_stream(base, PROMPT, args.new_tokens))
                results["library"].append(library_stream(model, ids, args.new_tokens))
                results["api_8"].append(api_concurrent(base, args.new_tokens))
                results["library_8"].append(library_concurrent(model, args.new_tokens))
    median = statistics.median
    summary = {
        "ttft_ms": {k: 1e3 * median(r["ttft_s"] for r in results[k]) for k in ("api", "library")},
        "decode_tokens_per_s": {
            k: median(r["decode_tokens_per_s"] for r in results[k]) for k in ("api", "library")
        },
        "concurrent_8_tokens_per_s": {
            "api": median(results["api_8"]),
            "library": median(results["library_8"]),
        },
    }
    table = Table(title=f"swarmllm api vs the library, 3 peers, {args.new_tokens} new tokens")
    for column in ("measure", "library (swarmllm generate)", "API", "API / library"):
        table.add_column(column)
    for label, key in (
        ("time to first token (ms)", "ttft_ms"),
        ("single-stream decode (tokens/s)", "decode_tokens_per_s"),
        (f"{CONCURRENT} concurrent streams (tokens/s)", "concurrent_8_tokens_per_s"),
    ):
        lib, api = summary[key]["library"], summary[key]["api"]
        table.add_row(label, f"{lib:.1f}", f"{api:.1f}", f"{api / lib:.2f}")
    Console().print(table)
    write_report(args.out, {"summary": summary, "runs": results, "new_tokens": args.new_tokens})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
