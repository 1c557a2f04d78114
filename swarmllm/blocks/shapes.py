"""The embedded model's small vision pair: synthetic shape pictures, their encoder and projector.

No pretrained vision model is reachable offline, so swarmllm trains its own for the embedded
SmolLM2 (``scripts/train_vision_adapter.py``): pictures of one coloured shape, drawn by code,
are encoded on the client into ``TOKENS_PER_IMAGE`` feature vectors; the projector (the
adapter block a peer serves with block 0) maps them into SmolLM2's embedding space.

The trained weights ship as one safetensors file holding both halves (``encoder.*`` and
``projector.*``) and the settings below as metadata, so a client and a peer that load the same
file always agree.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from swarmllm.blocks.embedded import EMBEDDED_NAME
from swarmllm.blocks.vision import ADAPTER_BLOCK, ImageEncoder, ImageError, ImageLike, VisionAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from swarmllm.blocks.sources import ModelSource

ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "smollm2_vision.safetensors"

IMAGE_SIZE = 32  # the encoder's input resolution; pictures of any size are resized to it
TOKENS_PER_IMAGE = 2
FEATURE_DIM = 32
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (245, 125, 15),
}
QUESTIONS = (
    "What shape is in the picture?",
    "What colour is the shape?",
    "What is in the picture?",
)
DRAW_SIZE = 64  # pictures of the data sets are drawn at this size


def answer(question: str, shape: str, colour: str) -> str:
    """The reference answer the model is trained to give."""
    if question == QUESTIONS[0]:
        return f"A {shape}."
    if question == QUESTIONS[1]:
        return f"{colour.capitalize()}."
    return f"A {colour} {shape}."


def answer_is_correct(question: str, reply: str, shape: str, colour: str) -> bool:
    """True when ``reply`` names what the question asks about and no wrong shape or colour."""
    words = set(reply.lower().replace(".", " ").replace(",", " ").split())
    wanted = {
        QUESTIONS[0]: {shape},
        QUESTIONS[1]: {colour},
    }.get(question, {shape, colour})
    named = words & (set(SHAPES) | set(COLOURS))
    return wanted <= named <= {shape, colour}


@dataclass(frozen=True)
class Scene:
    """One picture: a shape of a colour at a place, drawn on a light background."""

    shape: str
    colour: str
    cx: float  # centre, as a fraction of the picture's width and height
    cy: float
    size: float  # circumradius, as a fraction of the picture's width
    angle: float  # rotation in degrees
    background: int  # grey level of the background
    tint: tuple[int, int, int]  # small offset added to the colour

    def draw(self, size: int = DRAW_SIZE) -> Image.Image:
        image = Image.new("RGB", (size, size), (self.background,) * 3)
        fill = tuple(
            min(255, max(0, c + d)) for c, d in zip(COLOURS[self.colour], self.tint, strict=True)
        )
        cx, cy, r = self.cx * size, self.cy * size, self.size * size
        pen = ImageDraw.Draw(image)
        if self.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon(_polygon(self.shape, cx, cy, r, self.angle), fill=fill)
        return image


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        radii, corners = [r], 4
    elif shape == "triangle":
        radii, corners = [r], 3
    elif shape == "star":
        radii, corners = [r, r * 0.42], 10
    else:
        raise ValueError(f"unknown shape {shape!r}")
    start = math.radians(angle) - math.pi / 2 + (math.pi / 4 if shape == "square" else 0)
    return [
        (
            cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / corners),
            cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def random_scene(rng: random.Random, pairs: Sequence[tuple[str, str]]) -> Scene:
    shape, colour = rng.choice(pairs)
    size = rng.uniform(0.18, 0.32)
    return Scene(
        shape=shape,
        colour=colour,
        cx=rng.uniform(size, 1 - size),
        cy=rng.uniform(size, 1 - size),
        size=size,
        angle=rng.uniform(-15, 15),
        background=rng.randint(190, 255),
        tint=(rng.randint(-20, 20), rng.randint(-20, 20), rng.randint(-20, 20)),
    )


def scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """``count`` seeded scenes of the ``train`` or ``heldout`` split: every shape/colour pair,
    at places, sizes, angles, backgrounds and tints drawn from each split's own random stream."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    rng = random.Random(f"swarmllm-shapes-{split}-{seed}")
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    return [random_scene(rng, pairs) for _ in range(count)]


def pixels(image: Image.Image) -> torch.Tensor:
    """A picture as the encoder's input: [3, IMAGE_SIZE, IMAGE_SIZE] floats in [0, 1]."""
    small = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    data = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    return data.reshape(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1).float() / 255.0


class ShapesEncoder(nn.Module):
    """A small CNN: [images, 3, 32, 32] pixels → [images, TOKENS_PER_IMAGE, FEATURE_DIM]."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.tokens = nn.Linear(64, TOKENS_PER_IMAGE * FEATURE_DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.trunk(images)).reshape(-1, TOKENS_PER_IMAGE, FEATURE_DIM)


class ShapesProjector(nn.Module):
    """The adapter block: features [..., FEATURE_DIM] → embeddings [..., hidden_size]."""

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(FEATURE_DIM, width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(width, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


@dataclass(frozen=True)
class AssetInfo:
    """The settings stored with the trained weights."""

    hidden_size: int
    placeholder_token: str  # the prompt token whose positions the image features replace
    prompt_template: str  # the prompt trained on, with ``{image}`` and ``{question}`` fields
    model_name: str


def prompt_ids(
    tokenizer, template: str, question: str, placeholder_id: int, num_tokens: int
) -> list[int]:
    """Token ids of ``template`` with ``num_tokens`` placeholder ids in place of ``{image}``.

    The text on each side is tokenized on its own, exactly as in training.
    """
    before, after = template.split("{image}")
    return (
        tokenizer(before)["input_ids"]
        + [placeholder_id] * num_tokens
        + tokenizer(after.format(question=question))["input_ids"]
    )


def save_asset(
    path: Path, encoder: ShapesEncoder, projector: ShapesProjector, info: AssetInfo
) -> None:
    tensors = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    tensors |= {f"projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    save_file(tensors, str(path), metadata={"swarmllm": json.dumps(info.__dict__)})


def read_asset_info(path: Path = ASSET_PATH) -> AssetInfo:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        return AssetInfo(**json.loads(metadata["swarmllm"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a swarmllm vision asset: {e}") from e


def load_part(path: Path, part: str, module: nn.Module) -> nn.Module:
    """Load the ``encoder`` or ``projector`` half of an asset into ``module`` (strictly)."""
    prefix = f"{part}."
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True)
    return module.eval()


def serves(source: ModelSource) -> bool:
    """Whether the shipped vision pair belongs to ``source`` (the embedded model)."""
    return (
        source.name == EMBEDDED_NAME
        and ASSET_PATH.is_file()
        and read_asset_info().hidden_size == source.config.hidden_size
    )


def adapter_name(path: Path = ASSET_PATH) -> str:
    """``vision-<digest of the asset>``: peer and client must hold the same trained pair."""
    from swarmllm.blocks.digests import file_digest

    return f"{ADAPTER_BLOCK}-{file_digest(path)[:12]}"


def load_projector(source: ModelSource) -> VisionAdapter:
    projector = load_part(ASSET_PATH, "projector", ShapesProjector(source.config.hidden_size))
    return VisionAdapter(adapter_name(), FEATURE_DIM, projector)


class ShapesImageEncoder(ImageEncoder):
    """The embedded model's encoder: one picture → two feature vectors."""

    tokens_per_image = TOKENS_PER_IMAGE

    def __init__(self, encoder: ShapesEncoder, info: AssetInfo, image_token_id: int, name: str):
        self.encoder, self.info = encoder, info
        self.image_token_id, self.adapter_name = image_token_id, name

    @classmethod
    def load(cls, source: ModelSource) -> ShapesImageEncoder:
        info = read_asset_info()
        tokenizer = source.load_tokenizer()
        token_id = tokenizer.convert_tokens_to_ids(info.placeholder_token)
        encoder = load_part(ASSET_PATH, "encoder", ShapesEncoder())
        return cls(encoder, info, token_id, adapter_name())

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageLike]) -> torch.Tensor:
        batch = []
        for image in images:
            if isinstance(image, Image.Image):
                image = pixels(image)
            if image.shape != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise ImageError(
                    f"pixel values must have shape [3, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                    f"got {list(image.shape)}; pass a PIL image to have it resized"
                )
            batch.append(image.float())
        return self.encoder(torch.stack(batch))

    def prompt_ids(
        self, tokenizer: PreTrainedTokenizerBase, question: str, num_images: int, chat: bool
    ) -> torch.Tensor:
        """The chat prompt the pair was trained with (so ``chat`` changes nothing)."""
        if num_images != 1:
            raise ImageError(f"the embedded vision adapter reads one image, got {num_images}")
        ids = prompt_ids(
            tokenizer, self.info.prompt_template, question, self.image_token_id, TOKENS_PER_IMAGE
        )
        return torch.tensor([ids])
