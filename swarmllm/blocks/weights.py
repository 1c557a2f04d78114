"""Reading selected tensors from a model's safetensors files, never the whole model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from swarmllm.blocks.errors import ModelSourceError


def read_tensors(
    weight_files: Mapping[str, Path], names: Iterable[str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Load exactly ``names`` (cast to ``dtype``), opening each file once.

    Looking a name up in ``weight_files`` is what fetches and verifies its file
    (``WeightFiles``), so only the files holding ``names`` are ever touched.
    """
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        if name not in weight_files:
            raise KeyError(f"tensor {name!r} is missing from the model's weights")
        by_file[weight_files[name]].append(name)
    tensors = {}
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt") as handle:
            held = set(handle.keys())
            for name in file_names:
                if name not in held:
                    raise ModelSourceError(
                        f"weight file {path.name} ({path}) holds no tensor {name}, though the "
                        "model's index places it there"
                    )
                tensors[name] = handle.get_tensor(name).to(dtype)
    return tensors
