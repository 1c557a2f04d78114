"""How many blocks fit in the memory a peer may use, at its dtype and quantization.

A block costs its weights (counted from the family's own layer class built on the ``meta``
device, so no file is read) plus its share of the KV budget: ``--cache-tokens`` tokens of keys
and values at the compute dtype. The process's fixed cost (Python, torch, transformers,
hivemind: about 400 MiB of RAM, plus the CUDA context on a GPU) is not counted in
``--max-memory``; the default leaves room for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch
from transformers import PretrainedConfig

from swarmllm.blocks.families import meta_layer
from swarmllm.blocks.placement import Placement
from swarmllm.blocks.quantization import bytes_per_block

RAM_SHARE = 0.5  # of the RAM available now, for a CPU (or MPS: unified memory) peer
VRAM_SHARE = 0.9  # of the free memory of a CUDA device
VRAM_RESERVE = 1 << 30  # bytes of a CUDA device kept for activations and allocator slack


@dataclass(frozen=True)
class BlockBudget:
    max_memory: int  # bytes the peer may use for blocks and caches
    weight_bytes: int  # per block
    cache_bytes: int  # per block, for the whole KV budget
    cache_tokens: int
    placement: Placement
    default_memory: bool  # max_memory is the default share, not --max-memory

    @property
    def fits(self) -> int:
        return self.max_memory // (self.weight_bytes + self.cache_bytes)

    def describe(self, taken: int, num_layers: int) -> str:
        """The arithmetic in one line, for the peer's start-up output."""
        source = "default: a share of free memory" if self.default_memory else "--max-memory"
        return (
            f"memory: {_size(self.max_memory)} ({source}) / ({_size(self.weight_bytes)} weights "
            f"+ {_size(self.cache_bytes)} KV cache for {self.cache_tokens} tokens per block, "
            f"{self.placement.describe()}) = {self.fits} blocks; taking {taken} of {num_layers}"
        )


def block_budget(
    config: PretrainedConfig, placement: Placement, cache_tokens: int, max_memory: int | None
) -> BlockBudget:
    layer = meta_layer(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = torch.empty((), dtype=placement.dtype).element_size()
    return BlockBudget(
        max_memory=default_max_memory(placement.device) if max_memory is None else max_memory,
        weight_bytes=bytes_per_block(layer, placement),
        cache_bytes=2 * cache_tokens * kv_heads * head_dim * element,
        cache_tokens=cache_tokens,
        placement=placement,
        default_memory=max_memory is None,
    )


def default_max_memory(device: torch.device) -> int:
    """A safe share of the free memory of ``device`` (RAM for the CPU and MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * VRAM_SHARE) - VRAM_RESERVE)
    return int(psutil.virtual_memory().available * RAM_SHARE)


def parse_memory(text: str) -> int:
    """Bytes from ``4GiB``, ``512MB``, ``1.5G`` or a plain number of bytes."""
    units = {
        "": 1,
        "b": 1,
        "k": 1 << 10,
        "kb": 1000,
        "kib": 1 << 10,
        "m": 1 << 20,
        "mb": 1000**2,
        "mib": 1 << 20,
        "g": 1 << 30,
        "gb": 1000**3,
        "gib": 1 << 30,
        "t": 1 << 40,
        "tb": 1000**4,
        "tib": 1 << 40,
    }
    stripped = text.strip().lower()
    number = stripped.rstrip("abgikmt")
    unit = stripped[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"expected a memory size such as 4GiB, 512MB or 1000000, got {text!r}")
    return int(value * units[unit])


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"
