"""Which adapter block and image encoder a model has: the one place that knows every kind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmllm.blocks import llava, shapes
from swarmllm.blocks.vision import ImageEncoder, VisionAdapter

if TYPE_CHECKING:
    from swarmllm.blocks.sources import ModelSource


def load_adapter(source: ModelSource) -> VisionAdapter | None:
    """The model's adapter block, or None for a text-only model."""
    if source.multimodal_config is not None:
        return llava.load_projector(source)
    if shapes.serves(source):
        return shapes.load_projector(source)
    return None


def load_image_encoder(source: ModelSource) -> ImageEncoder | None:
    """The client's image encoder for the model, or None for a text-only model."""
    if source.multimodal_config is not None:
        return llava.LlavaImageEncoder.load(source)
    if shapes.serves(source):
        return shapes.ShapesImageEncoder.load(source)
    return None
