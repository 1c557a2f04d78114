"""Transformer blocks ``[start, end)`` of a model, loaded alone and run with a session cache."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmllm.blocks.families import family_of, sliding_window_of, weight_names
from swarmllm.blocks.kv_cache import KVCache, StackedCache
from swarmllm.blocks.masks import (
    attention_mask,
    decode_mask,
    decode_positions,
    position_ids,
)
from swarmllm.blocks.placement import Placement
from swarmllm.blocks.quantization import place_layer, release_freed_memory
from swarmllm.blocks.weights import read_tensors

CPU = torch.device("cpu")


class BlockSpan(nn.Module):
    """Decoder layers ``[start, end)`` driven by transformers' own layer classes.

    Layers keep their global ``layer_idx`` so per-layer settings (sliding windows) stay right.
    Everything a pass needs (layers, rotary tables, masks, positions, KV caches) lives on
    ``placement.device``: inputs move there once per call and outputs come back to the device
    the input came from (the CPU, for tensors off the wire).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        start: int,
        end: int,
        layers: nn.ModuleList,
        placement: Placement | None = None,
    ):
        super().__init__()
        self.config, self.start, self.end = config, start, end
        self.placement = placement or _placement_of(layers)
        self.layers = layers
        self.rotary = family_of(config).rotary_embedding(config=config).to(self.placement.device)
        self.windows = [sliding_window_of(config, i) for i in range(start, end)]

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype hidden states must have to enter the span (its compute dtype)."""
        return self.placement.dtype

    def sub_span(self, start: int, end: int) -> BlockSpan:
        """Layers ``[start, end)`` of this span, sharing its weights."""
        layers = self.layers[start - self.start : end - self.start]
        return BlockSpan(self.config, start, end, layers, self.placement)

    @classmethod
    def from_weights(
        cls,
        config: PretrainedConfig,
        weight_files: Mapping[str, Path],
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        *,
        placement: Placement | None = None,
    ) -> BlockSpan:
        """Build the span reading only its own layers' tensors from disk; each layer goes to
        ``placement`` (default: ``dtype`` on the CPU) as soon as it is read, so the float
        weights of a quantized span are never all in memory at once."""
        placement = placement or Placement(CPU, dtype)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(
                f"span [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks"
            )
        config = _with_sdpa(config)
        layer_cls = family_of(config).decoder_layer
        layer_prefix = weight_names(weight_files).layer_prefix
        layers = nn.ModuleList()
        for index in range(start, end):
            prefix = layer_prefix.format(index)
            names = [name for name in weight_files if name.startswith(prefix)]
            state = {
                name[len(prefix) :]: tensor
                for name, tensor in read_tensors(weight_files, names, placement.dtype).items()
            }
            with torch.device("meta"):
                layer = layer_cls(config, layer_idx=index)
            layer.load_state_dict(state, strict=True, assign=True)
            del state  # the layer holds the only references: quantizing frees them
            layers.append(place_layer(layer, placement))
        if placement.quant != "none":
            release_freed_memory()  # the float weights of the quantized layers
        return cls(config, start, end, layers, placement).eval()

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A cache for this span; with ``capacity``, allocated once at that many tokens."""
        return KVCache(range(self.start, self.end), capacity)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [batch, new, hidden] after the tokens already in ``cache``.

        ``cache`` is advanced past the new tokens; without a cache the call is stateless.
        ``pad_lengths`` [batch] counts the left-padding tokens of each row.
        """
        batch, num_new, _ = hidden.shape
        past = cache.length if cache is not None else 0
        device, returned_to = self.device, hidden.device
        pads = pad_lengths.to(device) if pad_lengths is not None else None
        positions = position_ids(batch, past, num_new, pads, device)
        masks = {
            window: attention_mask(batch, past, num_new, pads, window, device)
            for window in set(self.windows)
        }
        output = self._run_layers(hidden.to(device), positions, masks, cache)
        if cache is not None:
            cache.advance(num_new)
        return output.to(returned_to)

    @torch.inference_mode()
    def decode_batch(
        self,
        hiddens: Sequence[torch.Tensor],
        caches: Sequence[KVCache],
        pad_lengths: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """One new token for each of several sessions in a single pass: ``hiddens[i]``
        [rows_i, 1, hidden] follows the tokens in ``caches[i]`` (each advances by one).

        Equals calling ``forward`` on each session alone, up to float rounding.
        """
        rows = [hidden.shape[0] for hidden in hiddens]
        past = torch.tensor(
            [cache.length for cache, n in zip(caches, rows, strict=True) for _ in range(n)]
        )
        pads = torch.cat(
            [
                torch.zeros(n, dtype=torch.long) if pad is None else pad.cpu()
                for pad, n in zip(pad_lengths, rows, strict=True)
            ]
        )
        device, returned_to = self.device, hiddens[0].device
        past, pads = past.to(device), pads.to(device)  # one copy in for the whole batch
        stacked = StackedCache(caches, rows)
        masks = {
            window: decode_mask(past, pads, window, num_keys=stacked.total)
            for window in set(self.windows)
        }
        hidden = torch.cat(hiddens).to(device)
        hidden = self._run_layers(hidden, decode_positions(past, pads), masks, stacked)
        stacked.advance()
        return list(hidden.to(returned_to).split(rows))

    def _run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[int | None, torch.Tensor | None],
        cache: KVCache | StackedCache | None,
    ) -> torch.Tensor:
        rotary = self.rotary(hidden, positions)
        for layer, window in zip(self.layers, self.windows, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=positions,
                position_embeddings=rotary,
                cache=cache,
            )
        return hidden


def _placement_of(layers: nn.ModuleList) -> Placement:
    """Where existing layers live: the device and floating dtype of their parameters."""
    for param in layers.parameters():
        if param.is_floating_point():
            return Placement(param.device, param.dtype)
    return Placement(CPU, torch.float32)


def _with_sdpa(config: PretrainedConfig) -> PretrainedConfig:
    """Our masks are boolean SDPA masks, so the layers must use SDPA attention."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config
