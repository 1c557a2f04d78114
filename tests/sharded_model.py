"""A tiny Llama checkpoint sharded the way large hub models are, built from a config.

Shards: the embeddings alone; several layers per shard, with one layer split across two
shards; the final norm and LM head alone. ``SHARDS`` says which process needs which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from model_factory import COMMON
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

NUM_LAYERS = 8
# a vocabulary that makes the embeddings and head, like a real model's, far larger than the
# config, index and generation config that every process fetches besides its shards
VOCAB_SIZE = 4096
SPLIT_LAYER = 3  # its attention in one shard, its MLP and norms in the next
EMBEDDINGS, FIRST, SECOND, THIRD, HEAD = (
    f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)
)
SHARDS = {"embeddings": EMBEDDINGS, "head": HEAD}


def _shard_of(tensor: str) -> str:
    if tensor == "model.embed_tokens.weight":
        return EMBEDDINGS
    if not tensor.startswith("model.layers."):
        return HEAD  # model.norm.weight, lm_head.weight
    layer = int(tensor.split(".")[2])
    if layer < SPLIT_LAYER or (layer == SPLIT_LAYER and ".self_attn." in tensor):
        return FIRST
    return SECOND if layer < 6 else THIRD


def span_shards(start: int, end: int) -> set[str]:
    """The shards holding decoder layers ``[start, end)``."""
    names = [f"model.layers.{i}.{part}" for i in range(start, end) for part in _LAYER_PARTS]
    return {_shard_of(name) for name in names}


_LAYER_PARTS = ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")


def save_sharded_llama(directory: Path, seed: int = 0) -> Path:
    """Write the sharded checkpoint (config, generation config, index, 5 shards) into
    ``directory`` and return it; ``transformers`` loads it like any hub snapshot."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "num_hidden_layers": NUM_LAYERS, "vocab_size": VOCAB_SIZE})
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    write_shards(model.state_dict(), directory)
    return directory


def write_shards(state: dict[str, torch.Tensor], directory: Path) -> None:
    by_shard: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        by_shard.setdefault(_shard_of(name), {})[name] = tensor.contiguous()
    for shard, tensors in by_shard.items():
        save_file(tensors, directory / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {name: _shard_of(name) for name in sorted(state)},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
