"""Where a span (or the client's head) computes: device, dtype and quantization.

``resolve_placement("auto", "auto", "none")`` picks the first CUDA device, else MPS, else the
CPU, and bfloat16 where that device computes it fast (float32 otherwise). Every choice the
machine cannot honour raises ``PlacementError`` with one line naming the choice, before any
weights are read.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEVICE_CHOICES = "auto|cpu|cuda[:N]|mps"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTS = ("none", "int8", "nf4")
# "0": ``auto`` computes in float32 on a CPU even where bfloat16 is fast; "1": in bfloat16
CPU_BF16_ENV = "SWARMLLM_CPU_BF16"


class PlacementError(ValueError):
    """A device, dtype or quantization this machine cannot run."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # the compute dtype of activations, norms and the KV cache
    quant: str = "none"  # the span's linear layers: none | int8 | nf4

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        """The coarsest number format the span computes with (see ``dht.records.PRECISIONS``)."""
        return self.quant if self.quant != "none" else self.dtype_name

    def describe(self) -> str:
        quant = "" if self.quant == "none" else f" {self.quant}"
        return f"{self.dtype_name}{quant} on {self.device}"


def resolve_device(spec: str) -> torch.device:
    """``auto``: the first CUDA device, else MPS, else the CPU; otherwise check ``spec`` exists."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise PlacementError(f"--device {spec}: expected one of {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else "no CUDA device found"
            raise PlacementError(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__}, {build})"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise PlacementError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise PlacementError(f"--device {spec}: MPS (Apple GPU) is not available here")
        return device
    raise PlacementError(f"--device {spec}: expected one of {DEVICE_CHOICES}")


def auto_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device computes it fast, float32 otherwise.

    On CPUs without AMX/AVX512-BF16 (this project's 2-core VM: AVX2 only) bfloat16 matmuls are
    emulated: a 10-block SmolLM2 prompt pass took 9x as long as in float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.bfloat16 if torch.backends.mps.is_macos_or_newer(14, 0) else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def resolve_placement(device: str = "cpu", dtype: str = "auto", quant: str = "none") -> Placement:
    """Check the choices against this machine and fill in ``auto``; PlacementError if it can't."""
    if quant not in QUANTS:
        raise PlacementError(f"--quant {quant}: expected one of {'|'.join(QUANTS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise PlacementError(f"--dtype {dtype}: expected auto or one of {'|'.join(DTYPES)}")
    where = resolve_device(device)
    if quant == "none":
        compute = auto_dtype(where) if dtype == "auto" else DTYPES[dtype]
        return Placement(where, compute, quant)
    if where.type == "cpu":
        if quant == "nf4":
            raise PlacementError(
                "--quant nf4 runs only on CUDA (bitsandbytes); on the CPU use --quant int8"
            )
        compute = auto_dtype(where) if dtype == "auto" else DTYPES[dtype]
        return Placement(where, compute, quant)
    if where.type != "cuda":
        raise PlacementError(f"--quant {quant} is not available on {where.type}: use --quant none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PlacementError(
            f"--quant {quant} on CUDA needs bitsandbytes: pip install bitsandbytes"
        )
    compute = auto_dtype(where) if dtype == "auto" else DTYPES[dtype]
    if compute == torch.float32:
        raise PlacementError(
            f"--quant {quant} on CUDA computes in bfloat16 or float16, not --dtype float32"
        )
    return Placement(where, compute, quant)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _cpu_has_fast_bf16() -> bool:
    """Whether ``auto`` computes in bfloat16 on this CPU: ``SWARMLLM_CPU_BF16`` (0 or 1) says,
    else the CPU's flags (AVX-512 BF16 or AMX)."""
    override = os.environ.get(CPU_BF16_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise PlacementError(f"{CPU_BF16_ENV}={override!r}: expected 0 or 1")
        return override == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
