"""How many decode steps per second a peer's span runs, measured once per model and span."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from swarmllm.blocks.span import BlockSpan

logger = logging.getLogger("swarmllm.peer")

CONTEXT_TOKENS = 64
DECODE_STEPS = 8


def measure_throughput(span: BlockSpan) -> float:
    """Decode steps per second through the whole span after a short prefill."""
    dtype = span.dtype
    hidden_size = span.config.hidden_size
    cache = span.new_cache()
    span(torch.randn(1, CONTEXT_TOKENS, hidden_size, dtype=dtype), cache)
    timings = []
    for _ in range(DECODE_STEPS):
        started = time.perf_counter()
        span(torch.randn(1, 1, hidden_size, dtype=dtype), cache)
        timings.append(time.perf_counter() - started)
    return 1.0 / statistics.median(timings)


def cached_throughput(span: BlockSpan, model_id: str, cache_file: Path) -> float:
    """The measured throughput, reusing an earlier measurement of the same model/span/setup."""
    key = f"{model_id}:{span.start}-{span.end}:{span.dtype}:threads={torch.get_num_threads()}"
    if span.placement.quant != "none" or span.device.type != "cpu":
        key += f":{span.placement.quant}:{span.device}"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    throughput = measure_throughput(span)
    known[key] = throughput
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache_file)
    except OSError as e:
        logger.warning("could not save the throughput measurement to %s: %s", cache_file, e)
    return throughput
