"""How many decode steps per second a peer's span runs, measured once per model, span and setup.

The unit, announced as ``PeerRecord.decode_steps_per_s``: single-token decode steps of one
sequence per second through the peer's whole span, after a prefill of ``CONTEXT_TOKENS``. It is
measured the way the peer decodes (``BlockSpan.forward`` of one token on a session cache, on the
peer's ``--decode-threads`` torch threads, on its compute thread), and as the fastest of
``DECODE_STEPS`` steps after a warm-up, so that a peer measuring while another one loads its
weights beside it still reports what its hardware does, and peers on equal hardware announce
equal rates. Every step passes through every block of the span, so the rate is also each of
its blocks' share of the swarm's capacity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from swarmllm.blocks.span import BlockSpan

logger = logging.getLogger("swarmllm.peer")

CONTEXT_TOKENS = 64
WARMUP_STEPS = 2
DECODE_STEPS = 16
METHOD = "decode-v2"  # part of the cache key: measurements made another way are not reused


def measure_decode_rate(span: BlockSpan, threads: int) -> float:
    """Decode steps per second through ``span`` on ``threads`` torch threads (see module doc)."""
    dtype = span.dtype
    hidden_size = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cache = span.new_cache()
        prompt = torch.randn(1, CONTEXT_TOKENS, hidden_size, generator=generator, dtype=dtype).to(
            span.device
        )
        span.forward(prompt, cache, None)
        fastest = float("inf")
        for step in range(WARMUP_STEPS + DECODE_STEPS):
            hidden = torch.randn(1, 1, hidden_size, generator=generator, dtype=dtype).to(
                span.device
            )
            started = time.perf_counter()
            span.forward(hidden, cache, None)
            if step >= WARMUP_STEPS:
                fastest = min(fastest, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous_threads)
    return 1.0 / fastest


def cached_decode_rate(span: BlockSpan, model_id: str, threads: int, cache_file: Path) -> float:
    """``measure_decode_rate``, reusing an earlier measurement of the same model, span, dtype,
    thread count and method from ``cache_file`` (a JSON map shared by every peer of the user)."""
    dtype = str(span.dtype).removeprefix("torch.")
    key = f"{model_id}:{span.start}-{span.end}:{dtype}:threads={threads}:{METHOD}"
    if span.placement.quant != "none" or span.device.type != "cpu":
        key += f":{span.placement.quant}:{span.device}"
    known = _load(cache_file).get(key)
    if isinstance(known, (int, float)) and known > 0:
        return float(known)
    rate = measure_decode_rate(span, threads)
    try:
        save_measurement(cache_file, key, rate)
    except OSError as e:
        logger.warning("could not save the decode rate measurement to %s: %s", cache_file, e)
    return rate


def save_measurement(cache_file: Path, key: str, value: float) -> None:
    """Add ``key: value`` to the JSON map in ``cache_file``, replacing the file atomically.

    Each writer writes its own temporary file beside it and renames it over the old one, so
    readers and peers saving at the same time never see a partial file. Two peers saving at
    once may still each write the map without the other's new entry; that entry is then
    measured again next time.
    """
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    known = _load(cache_file)
    known[key] = value
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(known, out, indent=1)
        os.replace(tmp, cache_file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load(cache_file: Path) -> dict[str, object]:
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
