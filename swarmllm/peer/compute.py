"""One compute worker per peer: model work runs off the event loop, one call at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class ComputeWorker:
    """Runs callables on a single thread so the event loop keeps serving network I/O."""

    def __init__(self, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmllm-compute")

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
