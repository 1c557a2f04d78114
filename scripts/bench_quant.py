"""Float32, bfloat16 and quantized peers on the embedded model: memory, speed and accuracy.

For each configuration it starts a 3-peer swarm (10 blocks each) and measures:
- bytes per block (weights, as the peer's memory sizing counts them);
- peer resident memory (median of the three peers' RSS, once they have served);
- decode tokens/s of one session through the swarm, against local transformers ``generate``
  (float32 on the CPU, bfloat16 on a GPU);
- the max logit error and top-1 agreement against float32 transformers, teacher-forced on
  float32's own greedy answers, and how many greedy tokens equal float32's.
Prints a table and writes bench_results/bench_quant.json.

    python scripts/bench_quant.py                       # CPU: float32, bfloat16, int8
    python scripts/bench_quant.py --device cuda --configs bfloat16,int8,nf4
    python scripts/bench_quant.py --cpu-backends        # CPU int8 implementations, one span
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the swarmllm command runs (bench_swarm)

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from bench_common import TokenClock, write_report
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from swarmllm.blocks.head import ModelHead
from swarmllm.blocks.placement import resolve_placement
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import ModelSource, resolve_model
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.verification import relative_error
from swarmllm.peer.sizing import block_budget
from swarmllm.swarm import LocalSwarm

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "Name three prime numbers and say why they are prime.",
    "Give me a recipe for pancakes.",
]
PEER_FLAGS = {
    "float32": ["--dtype", "float32"],
    "bfloat16": ["--dtype", "bfloat16"],
    "float16": ["--dtype", "float16"],
    "int8": ["--quant", "int8"],
    "nf4": ["--quant", "nf4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="peers' and client's device")
    parser.add_argument("--configs", default="float32,bfloat16,int8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=5, help="prompts for greedy agreement")
    parser.add_argument("--cpu-backends", action="store_true", help="compare CPU int8 kernels")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_quant.json"))
    args = parser.parse_args()
    source = resolve_model(progress=False)
    if args.cpu_backends:
        report = {"cpu_int8_backends": cpu_backends(source)}
        write_report(args.out.with_name("bench_quant_cpu_backends.json"), report)
        return
    device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    reference = Reference(source, device, args.prompts, args.new_tokens)
    rows = [{"config": "local transformers", "decode_tps": reference.local_tps, "rss_mib": None}]
    for config in args.configs.split(","):
        rows.append(measure_swarm(source, config, args.device, reference, args.new_tokens))
        print_table(rows, reference)
    write_report(args.out, {"device": args.device, "rows": rows, "baseline": reference.label})


class Reference:
    """Float32 transformers: greedy answers and their logits; and local decode speed."""

    def __init__(self, source: ModelSource, device: torch.device, prompts: int, new: int):
        tokenizer = source.load_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        model = model.to(device).eval()
        model.generation_config.eos_token_id = None  # every answer runs to max_new_tokens
        self.prompts = [prompt_ids(tokenizer, p) for p in PROMPTS[:prompts]]
        self.answers, self.logits = [], []
        with torch.inference_mode():
            for ids in self.prompts:
                out = model.generate(ids.to(device), max_new_tokens=new, do_sample=False)
                self.answers.append(out.cpu())
                self.logits.append(model(out).logits.float().cpu())
        fast = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.label = f"transformers generate, {str(fast).removeprefix('torch.')} on {device}"
        model = model.to(fast)
        self.local_tps = statistics.median(
            _local_tps(model, self.prompts[0].to(device), new) for _ in range(3)
        )


def _local_tps(model: Any, ids: torch.Tensor, new: int) -> float:
    clock = TokenClock()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new, do_sample=False, streamer=clock)
    return clock.decode_tokens_per_second


def measure_swarm(
    source: ModelSource, config: str, device: str, reference: Reference, new: int
) -> dict[str, Any]:
    flags = [*PEER_FLAGS[config], "--device", device]
    dtype, quant = ("auto", config) if config in ("int8", "nf4") else (config, "none")
    placement = resolve_placement(device, dtype, quant)
    block_bytes = block_budget(source.config, placement, 1, 1).weight_bytes
    with LocalSwarm(3, source=source, peer_args=flags) as swarm:
        swarm.wait_until_ready(timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers, device=device
        ) as model:
            tps = []
            for _ in range(3):
                clock = TokenClock()
                model.generate(
                    reference.prompts[0], max_new_tokens=new, eos_token_id=[], streamer=clock
                )
                tps.append(clock.decode_tokens_per_second)
            same = total = top1 = positions = 0
            max_error = 0.0
            for ids, answer, logits in zip(
                reference.prompts, reference.answers, reference.logits, strict=True
            ):
                got = model.generate(ids, max_new_tokens=new, eos_token_id=[])
                same += int((got[0, ids.shape[1] :] == answer[0, ids.shape[1] :]).sum())
                total += new
                swarm_logits = model.forward(answer).float()
                max_error = max(max_error, float((swarm_logits - logits).abs().max()))
                top1 += int((swarm_logits.argmax(-1) == logits.argmax(-1)).sum())
                positions += answer.shape[1]
        # once they have served: an idle peer's float weights are mapped pages not yet read
        rss = statistics.median(psutil.Process(p.pid).memory_info().rss for p in swarm.peers)
    return {
        "config": f"3 peers, {placement.describe()}",
        "block_bytes": block_bytes,
        "rss_mib": rss / 2**20,
        "decode_tps": statistics.median(tps),
        "max_logit_error": max_error,
        "top1": top1 / positions,
        "greedy_same": f"{same}/{total}",
    }


def print_table(rows: list[dict[str, Any]], reference: Reference) -> None:
    table = Table(title=f"embedded SmolLM2-135M; speed against {reference.label}")
    columns = ("config", "bytes/block", "peer RSS", "decode tok/s", "vs local", "max logit err")
    for column in (*columns, "top-1", "greedy = fp32"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["config"],
            f"{row['block_bytes'] / 2**20:.2f} MiB" if "block_bytes" in row else "",
            f"{row['rss_mib']:.0f} MiB" if row.get("rss_mib") else "",
            f"{row['decode_tps']:.1f}",
            f"{row['decode_tps'] / reference.local_tps:.2f}",
            f"{row['max_logit_error']:.3f}" if "max_logit_error" in row else "",
            f"{row['top1']:.1%}" if "top1" in row else "",
            row.get("greedy_same", ""),
        )
    Console().print(table)


def cpu_backends(source: ModelSource) -> list[dict[str, Any]]:
    """Decode/prompt time and error of a 10-block span under each CPU int8 implementation."""
    torch.set_num_threads(1)
    base = BlockSpan.from_weights(source.config, source.weight_files(), 0, 10)
    ids = prompt_ids(source.load_tokenizer(), PROMPTS[1])
    hidden = ModelHead.from_weights(source.config, source.weight_files()).embed(ids)
    candidates = {"float32": lambda: base}
    candidates["int8 weight-only (swarmllm)"] = lambda: BlockSpan.from_weights(
        source.config,
        source.weight_files(),
        0,
        10,
        placement=resolve_placement("cpu", "auto", "int8"),
    )

    def dynamic() -> BlockSpan:
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)

    candidates["torch quantize_dynamic"] = dynamic
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        for config in (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig):

            def torchao(config=config) -> BlockSpan:
                span = copy.deepcopy(base)
                quantize_(span, config())
                return span

            candidates[f"torchao {config.__name__}"] = torchao
    except ImportError:
        print("torchao is not installed: pip install torchao to compare it", file=sys.stderr)
    rows = []
    with torch.inference_mode():
        expected = base(hidden)
        for name, build in candidates.items():
            span = build()
            cache = span.new_cache()
            span(torch.randn(1, 64, 576), cache)
            steps = []
            for _ in range(30):
                started = time.perf_counter()
                span(torch.randn(1, 1, 576), cache)
                steps.append(time.perf_counter() - started)
            started = time.perf_counter()
            span(torch.randn(1, 128, 576))
            prompt = time.perf_counter() - started
            error = relative_error(span(hidden), expected)
            rows.append(
                {
                    "backend": name,
                    "decode_ms": statistics.median(steps) * 1e3,
                    "prompt_128_ms": prompt * 1e3,
                    "relative_error": error,
                }
            )
            print(
                f"{name:45s} decode {rows[-1]['decode_ms']:6.1f} ms  128-token prompt "
                f"{rows[-1]['prompt_128_ms']:7.1f} ms  error {error:.3f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
