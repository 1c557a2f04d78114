"""Token ids (and pictures) of a request: chat messages through the model's chat template."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

from swarmllm.api.errors import bad_request
from swarmllm.api.schemas import ChatMessage, ImagePart
from swarmllm.blocks.vision import IMAGE_FORMATS, ImageError

if TYPE_CHECKING:
    from swarmllm.client.model import DistributedModelForCausalLM

MAX_IMAGE_BYTES = 20 * 1024 * 1024
_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.S
)


@dataclass
class Prompt:
    ids: torch.Tensor  # [1, n]
    images: list[Image.Image] = field(default_factory=list)


def completion_prompt(model: DistributedModelForCausalLM, text: str) -> Prompt:
    return Prompt(model.tokenizer(text, return_tensors="pt")["input_ids"])


def chat_prompt(model: DistributedModelForCausalLM, messages: list[ChatMessage]) -> Prompt:
    """The whole conversation in the chat template, ready for the assistant's reply."""
    images = [
        (m, p, part)
        for m, message in enumerate(messages)
        if not isinstance(message.content, str)
        for p, part in enumerate(message.content)
        if isinstance(part, ImagePart)
    ]
    if images:
        return _image_prompt(model, messages, images)
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            f"model {model.source.name} has no chat template; use /v1/completions",
            param="messages",
        )
    turns = [{"role": _role(m), "content": _text_of(m)} for m in messages]
    ids = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    return Prompt(ids)


def _image_prompt(
    model: DistributedModelForCausalLM,
    messages: list[ChatMessage],
    parts: list[tuple[int, int, ImagePart]],
) -> Prompt:
    first = f"messages[{parts[0][0]}].content[{parts[0][1]}]"
    try:
        encoder = model.image_encoder
    except ImageError as e:
        raise bad_request(str(e), param=first, code="images_not_supported") from None
    if len(messages) != 1 or messages[0].role != "user":
        raise bad_request(
            "a request with images takes one user message holding the pictures and the question "
            f"(the vision prompt of {model.source.name} has no room for other turns)",
            param="messages",
        )
    pictures = [
        decode_image(part.image_url.url, f"messages[{m}].content[{p}].image_url.url")
        for m, p, part in parts
    ]
    question = _text_of(messages[0])
    try:
        ids = encoder.prompt_ids(model.tokenizer, question, len(pictures), True)
    except ImageError as e:
        raise bad_request(str(e), param="messages[0].content") from None
    return Prompt(ids, pictures)


def decode_image(url: str, param: str) -> Image.Image:
    """A ``data:`` URI's PNG or JPEG as an RGB picture; anything else is refused."""
    match = _DATA_URI.match(url)
    if match is None:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise bad_request(
            f"image URLs with scheme {scheme!r} are not fetched (this server fetches nothing "
            "from the internet); send the picture inline as data:image/png;base64,...",
            param=param,
            code="image_url_not_supported",
        )
    if "base64" not in match["params"].split(";"):
        raise bad_request("image data URIs must be base64-encoded (;base64,)", param=param)
    data = match["data"]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise bad_request(f"the image exceeds {MAX_IMAGE_BYTES // 2**20} MiB", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the image's base64 data is invalid: {e}", param=param) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in IMAGE_FORMATS:
                raise bad_request(
                    f"the image is {image.format}; send one of {', '.join(IMAGE_FORMATS)}",
                    param=param,
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise bad_request(f"the image cannot be read: {e}", param=param) from None


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content if not isinstance(part, ImagePart))
