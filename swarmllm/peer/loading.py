"""Loading the span a peer serves (and, with block 0, the model's vision adapter), at start and
when it moves, on the compute thread; and what ``info`` says about it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

import swarmllm
from swarmllm.blocks.placement import Placement
from swarmllm.blocks.sources import ModelSource, cache_root
from swarmllm.blocks.span import BlockSpan
from swarmllm.blocks.vision import ADAPTER_BLOCK, VisionAdapter
from swarmllm.peer.batching import BatchingWorker
from swarmllm.peer.throughput import cached_decode_rate


@dataclass(frozen=True)
class LoadedSpan:
    span: BlockSpan
    adapter: VisionAdapter | None
    decode_rate: float  # single-token decode steps per second through the whole span

    @property
    def adapters(self) -> tuple[str, ...]:
        return (self.adapter.name,) if self.adapter is not None else ()

    @property
    def blocks(self) -> list[int | str]:
        """The DHT blocks to announce: the span's, and the adapter's with it."""
        blocks: list[int | str] = list(range(self.span.start, self.span.end))
        return [*blocks, ADAPTER_BLOCK] if self.adapter is not None else blocks


class SpanLoader:
    def __init__(
        self,
        source: ModelSource,
        placement: Placement,
        worker: BatchingWorker,
        decode_threads: int,
        with_adapter: bool,
    ):
        self.source, self.placement, self.worker = source, placement, worker
        self.decode_threads, self.with_adapter = decode_threads, with_adapter

    async def adapter_for(self, start: int) -> VisionAdapter | None:
        """The vision adapter, for a span starting at block 0 (images enter with block 0, in
        the first hop) of a model that has one; else None."""
        if not self.with_adapter or start != 0:
            return None
        # imported here: a peer without block 0 never loads the vision models' code
        from swarmllm.blocks.vision_factory import load_adapter

        return await self.worker.run(load_adapter, self.source)

    async def load(self, start: int, end: int, adapter: VisionAdapter | None = None) -> LoadedSpan:
        """Blocks ``[start, end)`` with ``adapter`` (see ``adapter_for``), and their measured
        decode rate."""
        source = self.source
        span = await self.worker.run(
            functools.partial(
                BlockSpan.from_weights,
                source.config,
                source.weight_files(),
                start,
                end,
                placement=self.placement,
            )
        )
        decode_rate = await self.worker.run(
            cached_decode_rate,
            span,
            source.model_id,
            self.decode_threads,
            cache_root() / "throughput.json",
        )
        return LoadedSpan(span, adapter, decode_rate)

    def info(self, loaded: LoadedSpan, public_name: str) -> dict[str, Any]:
        """The fields of the peer's ``info`` reply that describe what it serves."""
        placement = self.placement
        return {
            "model_id": self.source.model_id,
            "start": loaded.span.start,
            "end": loaded.span.end,
            "version": swarmllm.__version__,
            "torch": torch.__version__,
            "dtype": placement.dtype_name,
            "device": str(placement.device),
            "quant": placement.quant,
            "decode_steps_per_s": loaded.decode_rate,
            "state": "ONLINE",
            "public_name": public_name,
            "adapters": list(loaded.adapters),
        }
