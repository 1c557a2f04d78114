"""The decode rate a peer announces: measured the way it decodes, cached under a safe file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from swarmllm.blocks.kv_cache import KVCache
from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.peer import throughput
from swarmllm.peer.throughput import (
    CONTEXT_TOKENS,
    DECODE_STEPS,
    WARMUP_STEPS,
    cached_decode_rate,
    measure_decode_rate,
    save_measurement,
)


@pytest.fixture(scope="module")
def span(llama: ModelSource) -> BlockSpan:
    return BlockSpan.from_weights(llama.config, llama.weight_files(), 0, 2)


def test_decode_steps_run_one_token_on_a_session_cache_on_the_decode_threads(
    span: BlockSpan, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int, int]] = []  # (tokens, cache length before, torch threads)
    forward = BlockSpan.forward

    def spy(self: BlockSpan, hidden: torch.Tensor, cache: KVCache | None = None, pad=None):
        assert isinstance(cache, KVCache) and pad is None
        seen.append((hidden.shape[1], cache.length, torch.get_num_threads()))
        return forward(self, hidden, cache, pad)

    monkeypatch.setattr(BlockSpan, "forward", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rate = measure_decode_rate(span, threads=1)
        assert torch.get_num_threads() == 2  # the caller's setting comes back
    finally:
        torch.set_num_threads(previous)
    assert rate > 0
    prefill, *steps = seen
    assert prefill[:2] == (CONTEXT_TOKENS, 0)
    assert len(steps) == WARMUP_STEPS + DECODE_STEPS
    # one cache advancing a token per step, every step on the one decode thread asked for
    assert steps == [(1, CONTEXT_TOKENS + i, 1) for i in range(len(steps))]


def test_measurements_are_reused_only_for_the_same_setup(
    span: BlockSpan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[int] = []

    def fake_measure(span: BlockSpan, threads: int) -> float:
        measured.append(threads)
        return 10.0 * threads

    monkeypatch.setattr(throughput, "measure_decode_rate", fake_measure)
    cache_file = tmp_path / "throughput.json"
    assert cached_decode_rate(span, "m", 1, cache_file) == 10.0
    assert cached_decode_rate(span, "m", 1, cache_file) == 10.0
    assert cached_decode_rate(span, "m", 2, cache_file) == 20.0  # other threads: measured
    assert cached_decode_rate(span, "other-model", 1, cache_file) == 10.0
    assert measured == [1, 2, 1]
    # what a peer measured before (another method, another key) is not trusted
    cache_file.write_text(json.dumps({"m:0-2:torch.float32:threads=1": 999.0}))
    assert cached_decode_rate(span, "m", 1, cache_file) == 10.0


def test_concurrent_saves_keep_the_file_whole(tmp_path: Path) -> None:
    """Peers of one user share the file: each save must replace it whole, or not at all."""
    cache_file = tmp_path / "throughput.json"
    writers, saves = 6, 40
    errors: list[BaseException] = []
    broken_reads: list[str] = []
    start = threading.Barrier(writers + 1)
    done = threading.Event()

    def write(writer: int) -> None:
        start.wait()
        try:
            for save in range(saves):
                save_measurement(cache_file, f"w{writer}:{save}", float(save))
        except BaseException as e:
            errors.append(e)

    def read() -> None:
        start.wait()
        while not done.is_set():
            try:
                text = cache_file.read_text()
            except FileNotFoundError:
                continue
            try:
                json.loads(text)
            except ValueError:
                broken_reads.append(text)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    reader = threading.Thread(target=read)
    for thread in [*threads, reader]:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    reader.join(timeout=10)
    assert not errors, errors[0]
    assert not broken_reads, broken_reads[0][:200]
    assert json.loads(cache_file.read_text())  # whole, and holds at least the last save
    assert list(tmp_path.iterdir()) == [cache_file]  # no temporary file left behind
