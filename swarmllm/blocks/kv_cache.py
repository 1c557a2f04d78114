"""A per-session key/value cache for a span of decoder layers.

transformers' attention modules only call ``cache.update(key, value, layer_idx, ...)``, so this
small class stands in for ``DynamicCache``: it keeps one buffer per layer, and rewinding is just
moving ``length`` back. A cache made with a ``capacity`` (a peer's session, admitted at that
length) allocates each buffer once, at that capacity, and refuses to grow past it, so its memory
is exactly what the session reserved; without one (local runs) buffers grow by doubling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

MIN_CAPACITY = 64


class KVCache:
    def __init__(self, layer_indices: Iterable[int], capacity: int | None = None):
        self.capacity = capacity
        self._slot = {layer: slot for slot, layer in enumerate(layer_indices)}
        self._keys: list[torch.Tensor | None] = [None] * len(self._slot)
        self._values: list[torch.Tensor | None] = [None] * len(self._slot)
        self.length = 0  # tokens already cached (identical for every layer between forwards)

    def truncate(self, length: int) -> None:
        """Forget every token at position ``length`` and after (a rewind)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens to {length}")
        self.length = length

    def advance(self, num_tokens: int) -> None:
        """Commit the tokens written by the forward pass that just ran."""
        self.length += num_tokens

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` [batch, heads, new, dim] after the cached tokens; return all."""
        slot = self._slot[layer_idx]
        end = self.length + key.shape[-2]
        self._keys[slot] = self._ensure_room(self._keys[slot], key, end)
        self._values[slot] = self._ensure_room(self._values[slot], value, end)
        self._keys[slot][:, :, self.length : end] = key
        self._values[slot][:, :, self.length : end] = value
        return self._keys[slot][:, :, :end], self._values[slot][:, :, :end]

    def _ensure_room(
        self, buffer: torch.Tensor | None, new: torch.Tensor, end: int
    ) -> torch.Tensor:
        if buffer is not None and buffer.shape[-2] >= end and buffer.shape[0] == new.shape[0]:
            return buffer
        if self.capacity is not None:
            if end > self.capacity:
                raise ValueError(f"{end} tokens exceed the cache's capacity of {self.capacity}")
            if buffer is not None:
                raise ValueError(
                    f"a cache of {buffer.shape[0]} rows cannot take {new.shape[0]} rows"
                )
            return new.new_empty(*new.shape[:2], self.capacity, new.shape[-1])
        capacity = max(MIN_CAPACITY, end, 2 * (buffer.shape[-2] if buffer is not None else 0))
        grown = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
        if buffer is not None and self.length:
            grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown


class StackedCache:
    """Several sessions' caches seen as one batch, for a single-token step of all of them.

    Rows ``[r, r + rows[i])`` of the batch belong to ``caches[i]``. ``update`` writes each
    session's new key/value into its own cache and returns every session's keys/values
    right-padded with zeros to the longest one (a mask must hide the padding: see
    ``masks.decode_mask``). Call ``advance`` once after the forward pass.
    """

    def __init__(self, caches: Sequence[KVCache], rows: Sequence[int]):
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("a session's cache appears twice in one batch")
        self.caches, self.rows = list(caches), list(rows)
        self.total = max(cache.length for cache in caches) + 1

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, dim = key.shape
        keys = key.new_zeros(batch, heads, self.total, dim)
        values = value.new_zeros(batch, heads, self.total, dim)
        row = 0
        for cache, rows in zip(self.caches, self.rows, strict=True):
            end = row + rows
            own_keys, own_values = cache.update(key[row:end], value[row:end], layer_idx)
            keys[row:end, :, : own_keys.shape[-2]] = own_keys
            values[row:end, :, : own_values.shape[-2]] = own_values
            row = end
        return keys, values

    def advance(self) -> None:
        for cache in self.caches:
            cache.advance(1)
