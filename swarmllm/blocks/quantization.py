"""Putting a freshly loaded decoder layer on its device, quantizing its linear layers.

- CPU ``int8``: weight-only, per output channel (absmax / 127), dequantized on the fly by one
  cast inside ``F.linear``; activations, norms and the KV cache keep the compute dtype.
  Measured on this project's 2-core VM (10 SmolLM2 blocks, one thread, decode after 64 tokens;
  relative L2 error of the span's output against float32 on a chat prompt):

  | CPU int8 implementation | decode | 128-token prompt | error |
  |---|---|---|---|
  | float32 (reference) | 25 ms | 164 ms | 0 |
  | this module (weight-only) | 25 ms | 201 ms | 0.037 |
  | torch ``quantize_dynamic`` (int8 activations too) | 32 ms | 215 ms | 0.55 |
  | torchao 0.18 ``Int8WeightOnlyConfig`` (eager) | 99 ms | 437 ms | |
  | torchao 0.18 ``Int8DynamicActivationInt8WeightConfig`` | 171 ms | 8879 ms | |
  | ``torch._weight_int8pack_mm`` (one 576x1536 linear, 1 token) | 11x fp32 | | |

  torch's dynamic quantization quantizes each call's activations per tensor, and SmolLM2's
  ``down_proj`` inputs carry outlier channels: that layer alone gave an error of 0.49, and
  greedy output left float32's after one token. torchao does what this module does, four
  times slower in eager mode, and once installed transformers imports it into every process.
- CUDA ``int8``/``nf4``: bitsandbytes' LLM.int8() (``Linear8bitLt``, outlier threshold 6.0)
  and NF4 (``Linear4bit``, blocks of 64, compressed statistics), as Petals does: the modules
  are swapped on the CPU and quantize when moved to the GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from swarmllm.blocks.placement import Placement


def place_layer(layer: nn.Module, placement: Placement) -> nn.Module:
    """``layer`` (float weights on the CPU) on ``placement``'s device, dtype and quantization.
    The float weights of quantized linear layers are released."""
    if placement.quant == "none":
        return layer.to(placement.device, placement.dtype)
    if placement.device.type == "cpu":
        _swap_linears(layer, lambda linear: Int8WeightOnlyLinear(linear, placement.dtype))
        layer = layer.to(placement.dtype)  # the norms; int8 buffers keep their dtype
        for param in layer.parameters():
            # a tensor read by safetensors can be a view of the whole mapped file: one left
            # (a norm's weight) keeps every page the quantizer read resident
            param.data = param.data.clone()
        return layer
    _swap_linears(layer, lambda linear: _bitsandbytes_linear(linear, placement))
    return layer.to(placement.device)  # bitsandbytes quantizes as the weights move


def release_freed_memory() -> None:
    """Hand memory freed inside malloc's heaps back to the OS (glibc; a no-op elsewhere).

    A span loads on the peer's compute thread, whose malloc arena keeps the freed float
    weights of quantized layers: an int8 peer of 10 SmolLM2 blocks stayed 83 MiB above what
    it holds until this trim.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer holding int8 weights and one float scale per output channel."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _scratch.dequantized(self.weight, x.dtype)
        out = F.linear(x, weight) * self.scale
        return out if self.bias is None else out + self.bias


class _DequantizationScratch(threading.local):
    """One buffer per thread that int8 weights are cast into before their matmul.

    Casting into a fresh tensor on every call left the freed float copies in glibc's arenas:
    an int8 peer of 10 SmolLM2 blocks grew by 29 MiB once it had served, which ate half of
    what int8 saves. The buffer costs one float copy of the largest weight, per thread.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def dequantized(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffer
        if buffer is None or buffer.dtype != dtype or buffer.numel() < weight.numel():
            size = max(weight.numel(), buffer.numel() if buffer is not None else 0)
            with torch.inference_mode(False):  # usable inside and outside inference mode
                buffer = self.buffer = torch.empty(size, dtype=dtype)
        return buffer[: weight.numel()].view(weight.shape).copy_(weight)


_scratch = _DequantizationScratch()


def _swap_linears(layer: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))


def _bitsandbytes_linear(linear: nn.Linear, placement: Placement) -> nn.Module:
    """bitsandbytes' module for ``linear`` (still on the CPU: it quantizes on ``.to(cuda)``)."""
    import bitsandbytes as bnb

    weight = linear.weight.data.to(placement.dtype)
    has_bias = linear.bias is not None
    if placement.quant == "int8":
        quantized = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=6.0,  # the LLM.int8() paper's outlier threshold
        )
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=placement.dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
        )
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.data.to(placement.dtype), requires_grad=False)
    return quantized


def bytes_per_block(layer: nn.Module, placement: Placement) -> int:
    """Bytes of one decoder layer's weights at ``placement`` (``layer`` may live on ``meta``).

    Linear weights: int8 1 byte per weight + a scale per output row, nf4 half a byte + 1
    byte of absmax per 64 weights (+ 4 bytes per 256 absmax blocks); everything else (norms,
    biases) at the compute dtype.
    """
    element = torch.empty((), dtype=placement.dtype).element_size()
    total = 0
    for module in layer.modules():
        for name, param in module.named_parameters(recurse=False):
            count = param.numel()
            if not isinstance(module, nn.Linear) or name != "weight" or placement.quant == "none":
                total += count * element
            elif placement.quant == "int8":
                total += count + 4 * module.out_features
            else:  # nf4
                total += count // 2 + count // 64 + 4 * (count // (64 * 256) + 1)
    return total
