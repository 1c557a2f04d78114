"""LLaVA checkpoints: the vision tower runs on the client, the projector is the adapter block.

The language model's blocks are served like any other model's (``families.weight_names``
finds them under the checkpoint's prefix); this module loads only the vision side, reading
just the tensors it needs, and reproduces ``LlavaModel.get_image_features`` in two halves:
the tower and feature selection here, the projection on the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from swarmllm.blocks.vision import ADAPTER_BLOCK, ImageEncoder, ImageError, ImageLike, VisionAdapter
from swarmllm.blocks.weights import read_tensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from swarmllm.blocks.sources import ModelSource

# Where checkpoints keep each part, as transformers 5 writes them, then the newer naming.
TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def _load_module(module: nn.Module, source: ModelSource, prefixes: Sequence[str]) -> nn.Module:
    """Fill ``module`` with the checkpoint's tensors under the first of ``prefixes`` present;
    raises a ValueError naming what is missing."""
    files = source.weight_files()
    expected = set(module.state_dict())
    for prefix in prefixes:
        names = [name for name in files if name.startswith(prefix)]
        if not names:
            continue
        stored = {name[len(prefix) :]: name for name in names}
        if not expected <= set(stored):  # 4.x towers nest the model one level deeper
            stored = {k.removeprefix("vision_model."): v for k, v in stored.items()}
        missing = sorted(expected - set(stored))
        if missing:
            raise ValueError(f"{source.path}: tensors {prefix}{missing[0]}… are missing")
        tensors = read_tensors(files, [stored[key] for key in expected], torch.float32)
        module.load_state_dict(
            {key: tensors[stored[key]] for key in expected}, strict=True, assign=True
        )
        return module.eval()
    raise ValueError(f"{source.path} holds no tensors under {' or '.join(prefixes)}")


def load_projector(source: ModelSource) -> VisionAdapter:
    config = source.multimodal_config
    projector = LlavaMultiModalProjector(config)
    _load_module(projector, source, PROJECTOR_PREFIXES)
    return VisionAdapter(ADAPTER_BLOCK, projector.linear_1.in_features, projector)


class LlavaImageEncoder(ImageEncoder):
    """The checkpoint's vision tower and LLaVA's feature selection."""

    adapter_name = ADAPTER_BLOCK  # the projector is part of the checkpoint: the model id pins it

    def __init__(self, config: PretrainedConfig, tower: nn.Module, processor=None):
        self.config, self.tower, self.processor = config, tower, processor
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens_per_image = patches + (config.vision_feature_select_strategy == "full")

    @classmethod
    def load(cls, source: ModelSource) -> LlavaImageEncoder:
        config = source.multimodal_config
        tower = AutoModel.from_config(config.vision_config)  # not on meta: it has buffers
        _load_module(tower, source, TOWER_PREFIXES)
        processor = None
        if (source.path / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(source.path)
        return cls(config, tower, processor)

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageLike]) -> torch.Tensor:
        outputs = self.tower(self._pixel_values(images), output_hidden_states=True)
        layers = self.config.vision_feature_layer
        chosen = [layers] if isinstance(layers, int) else list(layers)
        selected = [outputs.hidden_states[layer] for layer in chosen]
        if self.config.vision_feature_select_strategy == "default":
            selected = [states[:, 1:] for states in selected]  # drop the CLS token
        return torch.cat(selected, dim=-1)

    def _pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor:
        vision = self.config.vision_config
        shape = (vision.num_channels, vision.image_size, vision.image_size)
        values = []
        for image in images:
            if isinstance(image, torch.Tensor):
                if tuple(image.shape) != shape:
                    raise ImageError(
                        f"pixel values must have shape {list(shape)}, got {list(image.shape)}"
                    )
                values.append(image.float())
            elif self.processor is None:
                raise ImageError(
                    "this checkpoint has no preprocessor_config.json: pass pixel values "
                    f"{list(shape)} instead of pictures"
                )
            else:
                values.append(self.processor(images=image, return_tensors="pt")["pixel_values"][0])
        return torch.stack(values)

    def prompt_ids(
        self, tokenizer: PreTrainedTokenizerBase, question: str, num_images: int, chat: bool
    ) -> torch.Tensor:
        """``<image>`` × num_images, a newline and the question (in the chat template with
        ``chat``), each ``<image>`` expanded to ``tokens_per_image`` placeholders."""
        marker = tokenizer.convert_ids_to_tokens(self.image_token_id)
        text = marker * num_images + "\n" + question
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        first, *rest = text.split(marker)
        ids = tokenizer(first)["input_ids"]
        for piece in rest:
            ids += [self.image_token_id] * self.tokens_per_image
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids])
