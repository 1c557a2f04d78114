"""The multimodal adapter block, and the client's image encoder that feeds it.

Images never leave the client: its encoder turns each picture into feature vectors
(``[tokens_per_image, feature_dim]``). The first message to the first hop carries them with the
token positions of the prompt's image placeholders (``ImageInputs``). The peer serving block 0
also serves the adapter block: it projects the features to the model's hidden size and splices
them into the hidden states at those positions before block 0 runs. The KV cache then holds the
image tokens, so later steps are text only.

The adapter is announced in the DHT like a block, under ``{model_id}.vision``, and listed in the
peer's record as ``adapter_name``: ``vision`` when the projector comes from the checkpoint
itself (its weights are part of the model id), ``vision-<digest>`` when it ships separately (the
embedded model's), so a client only routes to a peer whose projector matches its encoder.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


ADAPTER_BLOCK = "vision"  # the adapter's DHT block name: key ``{model_id}.vision``
IMAGE_FORMATS = ("PNG", "JPEG")

ImageLike = Image.Image | torch.Tensor  # a picture, or pixel values already preprocessed


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, or not matching the prompt."""


@dataclass(frozen=True)
class ImageInputs:
    """Image features of one message and where they go.

    ``features`` [images, tokens, feature_dim] float; ``positions`` [images, tokens] int64, the
    absolute token positions (in the session, batch row 0) that the features replace.
    """

    features: torch.Tensor
    positions: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """As sent on the wire, after the hidden states (and covered by the hop's signature)."""
        return [self.features, self.positions]

    def shifted(self, offset: int) -> ImageInputs:
        return ImageInputs(self.features, self.positions + offset)

    def to(self, dtype: torch.dtype) -> ImageInputs:
        return ImageInputs(self.features.to(dtype), self.positions)

    def before(self, position: int) -> ImageInputs | None:
        """The images lying wholly before ``position`` (None if none); raises ImageError if one
        straddles it, since its placeholders can't be re-sent without all its features."""
        inside = self.positions < position
        whole = inside.all(dim=1)
        if (inside.any(dim=1) & ~whole).any():
            raise ImageError(f"position {position} falls inside an image's placeholder tokens")
        if not whole.any():
            return None
        return ImageInputs(self.features[whole], self.positions[whole])


def splice(hidden: torch.Tensor, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of ``hidden`` [1, tokens, hidden] with ``embeddings`` [n, hidden] at ``positions``
    [n] (indices into the message); every other position is unchanged."""
    spliced = hidden.clone()
    spliced[0, positions] = embeddings.to(hidden.dtype)
    return spliced


class VisionAdapter(nn.Module):
    """The adapter block a peer serves with block 0: projector plus splicing."""

    def __init__(self, name: str, feature_dim: int, projector: nn.Module):
        super().__init__()
        self.name, self.feature_dim, self.projector = name, feature_dim, projector

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, images: ImageInputs, position: int) -> torch.Tensor:
        """``hidden`` of a message starting at ``position``, projected images spliced in."""
        dtype = next(self.projector.parameters()).dtype
        projected = self.projector(images.features.to(dtype))
        return splice(
            hidden,
            projected.reshape(-1, projected.shape[-1]),
            images.positions.reshape(-1) - position,
        )


class ImageEncoder(abc.ABC):
    """The client's half: pictures → features for the adapter, and prompts with placeholders."""

    adapter_name: str  # the adapter a first hop must announce to take these features
    image_token_id: int  # the prompt token whose positions the features replace
    tokens_per_image: int

    @abc.abstractmethod
    def encode(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Features [images, tokens_per_image, feature_dim] (float32)."""

    @abc.abstractmethod
    def prompt_ids(
        self, tokenizer: PreTrainedTokenizerBase, question: str, num_images: int, chat: bool
    ) -> torch.Tensor:
        """Token ids [1, n] of a prompt asking ``question`` about ``num_images`` images."""

    def image_inputs(self, input_ids: torch.Tensor, images: Sequence[ImageLike]) -> ImageInputs:
        """Encode ``images`` and place them at ``input_ids``' placeholders (positions relative
        to ``input_ids``). The prompt needs ``tokens_per_image`` placeholders per image."""
        if input_ids.shape[0] != 1:
            raise ImageError(f"images need a batch of one prompt, got {input_ids.shape[0]}")
        if not images:
            raise ImageError("no images given")
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        expected = len(images) * self.tokens_per_image
        if positions.numel() != expected:
            raise ImageError(
                f"the prompt has {positions.numel()} image placeholder tokens (id "
                f"{self.image_token_id}); {len(images)} image(s) need {expected}"
            )
        features = self.encode(images)
        return ImageInputs(features, positions.reshape(len(images), self.tokens_per_image))


def load_image(path: str | Path) -> Image.Image:
    """A PNG or JPEG file as an RGB picture; ImageError says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                raise ImageError(
                    f"image {path} is {image.format}; use one of {', '.join(IMAGE_FORMATS)}"
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from e
