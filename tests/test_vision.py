"""The adapter block without a network: splicing, image-input validation, images and prompts."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from llava_factory import IMAGE_TOKEN, save_tiny_llava
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from swarmllm.blocks import shapes
from swarmllm.blocks.local_vision import LocalVisionChain
from swarmllm.blocks.sources import resolve_model
from swarmllm.blocks.vision import ImageError, ImageInputs, VisionAdapter, load_image, splice
from swarmllm.security.validation import InvalidRequest, check_image_inputs


def test_splice_puts_features_exactly_at_the_placeholders_and_keeps_the_rest():
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 8)
    embeddings = torch.randn(3, 8)
    positions = torch.tensor([2, 3, 7])
    spliced = splice(hidden, embeddings, positions)
    assert torch.equal(spliced[0, positions], embeddings)
    others = [i for i in range(10) if i not in positions.tolist()]
    assert torch.equal(spliced[0, others], hidden[0, others])
    assert torch.equal(hidden, hidden.clone())  # the input is not modified in place


def test_the_adapter_projects_and_splices_at_absolute_positions_of_a_later_message():
    torch.manual_seed(0)
    projector = torch.nn.Linear(4, 8)
    adapter = VisionAdapter("vision", 4, projector)
    hidden = torch.randn(1, 6, 8)
    features = torch.randn(2, 2, 4)  # two images of two tokens
    # the message starts at session position 20; placeholders at 21, 22 and 24, 25
    images = ImageInputs(features, torch.tensor([[21, 22], [24, 25]]))
    out = adapter(hidden, images, position=20)
    expected = hidden.clone()
    expected[0, [1, 2, 4, 5]] = projector(features.reshape(4, 4)).detach()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _check(features, positions, **overrides):
    kwargs = dict(feature_dim=4, dtype=torch.float32, batch=1, position=10, num_tokens=6)
    check_image_inputs(features, positions, **(kwargs | overrides))


def test_valid_image_inputs_pass():
    _check(torch.zeros(1, 3, 4), torch.tensor([[11, 12, 13]]))


@pytest.mark.parametrize(
    ("features", "positions", "overrides", "complaint"),
    [
        (torch.zeros(1, 3, 5), torch.tensor([[11, 12, 13]]), {}, "feature size 5"),
        (torch.full((1, 3, 4), math.nan), torch.tensor([[11, 12, 13]]), {}, "NaN"),
        (torch.zeros(1, 3, 4), torch.tensor([[11, 12]]), {}, "one per feature vector"),
        (torch.zeros(1, 3, 4), torch.tensor([[11.0, 12.0, 13.0]]), {}, "int64"),
        (torch.zeros(1, 3, 4), torch.tensor([[11, 12, 16]]), {}, "lie in this message"),
        (torch.zeros(1, 3, 4), torch.tensor([[9, 12, 13]]), {}, "lie in this message"),
        (torch.zeros(1, 3, 4), torch.tensor([[11, 11, 13]]), {}, "repeat"),
        (torch.zeros(3, 4), torch.tensor([11, 12, 13]), {}, "shape [images, tokens"),
        (torch.zeros(1, 3, 4, dtype=torch.float16), torch.tensor([[11, 12, 13]]), {}, "dtype"),
        (torch.zeros(1, 3, 4), torch.tensor([[11, 12, 13]]), {"batch": 2}, "batch of one"),
    ],
)
def test_bad_image_inputs_are_refused_with_the_reason(features, positions, overrides, complaint):
    with pytest.raises(InvalidRequest, match=re.escape(complaint)):
        _check(features, positions, **overrides)


def test_rewinding_keeps_whole_images_and_refuses_to_cut_one():
    images = ImageInputs(torch.zeros(2, 2, 4), torch.tensor([[2, 3], [8, 9]]))
    kept = images.before(5)
    assert kept is not None and kept.positions.tolist() == [[2, 3]]
    assert images.before(2) is None
    assert images.before(10).positions.tolist() == [[2, 3], [8, 9]]
    with pytest.raises(ImageError, match="inside an image"):
        images.before(9)


def test_load_image_reads_png_and_jpeg_and_names_bad_files(tmp_path):
    picture = Image.new("RGB", (8, 8), (255, 0, 0))
    picture.save(tmp_path / "a.png")
    picture.save(tmp_path / "a.jpg")
    picture.save(tmp_path / "a.gif")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 0, 0)
    assert load_image(tmp_path / "a.jpg").size == (8, 8)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ImageError, match="GIF"):
        load_image(tmp_path / "a.gif")


def test_synthetic_splits_are_seeded_and_apart():
    train = shapes.scenes("train", 300)
    assert train == shapes.scenes("train", 300)
    held_out = shapes.scenes("heldout", 300)
    assert not set(train) & set(held_out)
    assert {(s.shape, s.colour) for s in held_out} == {
        (shape, colour) for shape in shapes.SHAPES for colour in shapes.COLOURS
    }
    picture = held_out[0].draw()
    assert shapes.pixels(picture).shape == (3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


@pytest.mark.parametrize(
    ("question", "reply", "correct"),
    [
        (shapes.QUESTIONS[0], "A circle.", True),
        (shapes.QUESTIONS[0], "A red circle.", True),
        (shapes.QUESTIONS[0], "A red square.", False),
        (shapes.QUESTIONS[0], "Red.", False),
        (shapes.QUESTIONS[1], "Red.", True),
        (shapes.QUESTIONS[1], "Blue.", False),
        (shapes.QUESTIONS[2], "A red circle.", True),
        (shapes.QUESTIONS[2], "A circle.", False),
        (shapes.QUESTIONS[2], "A red circle and a blue star.", False),
    ],
)
def test_answers_are_graded_by_the_words_they_name(question, reply, correct):
    assert shapes.answer_is_correct(question, reply, "circle", "red") is correct


def _renamed_to_the_newer_llava_layout(source: Path, target: Path) -> Path:
    """A copy of a LLaVA checkpoint with tensors named as ``model.language_model.*`` etc."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    renames = [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]
    renamed = {}
    for name, tensor in tensors.items():
        old, new = next((o, n) for o, n in renames if name.startswith(o))
        renamed[new + name[len(old) :]] = tensor
    save_file(renamed, target / "model.safetensors")
    return target


def test_llava_in_process_equals_transformers_in_both_weight_layouts(tmp_path):
    written = save_tiny_llava("llama", tmp_path / "llava")
    renamed = _renamed_to_the_newer_llava_layout(written, tmp_path / "renamed")
    reference = LlavaForConditionalGeneration.from_pretrained(written).eval()
    ids = torch.tensor([[5, 9, *[IMAGE_TOKEN] * 4, 17, 3, 8]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
    for directory in (written, renamed):
        source = resolve_model(directory, cache_dir=tmp_path / "cache")
        assert source.multimodal_config is not None
        local = LocalVisionChain.load(source, num_spans=2)
        torch.testing.assert_close(local.prefill(ids, [pixels[0]]), expected, atol=1e-5, rtol=0)
