"""The API server's pure pieces: stop sequences in streamed text, request checks, images."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from swarmllm.api.errors import APIError, field_path
from swarmllm.api.prompts import decode_image
from swarmllm.api.schemas import ChatCompletionRequest, CompletionRequest
from swarmllm.api.text import TextStream

# a toy tokenizer: each token id is one piece of text
PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: " EN", 7: "D", 8: "\ufffd"}


def _decode(tokens: list[int]) -> str:
    return "".join(PIECES[t] for t in tokens)


def _run(tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(_decode, stop)
    deltas = []
    for token in tokens:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return [d for d in deltas if d], stream


def test_without_stop_sequences_every_token_is_sent_as_it_comes():
    deltas, stream = _run([1, 2, 3, 4])
    assert deltas == ["Hel", "lo", " wor", "ld"]
    assert stream.text == "Hello world"


def test_a_stop_sequence_is_cut_with_what_follows_and_never_sent():
    deltas, stream = _run([1, 2, 6, 7, 5], stop=(" END",))
    assert "".join(deltas) == "Hello" and stream.stopped
    assert stream.tokens == [1, 2, 6, 7]  # stopped as soon as it showed


def test_text_that_may_begin_a_stop_sequence_is_held_back_then_released():
    stream = TextStream(_decode, (" ENDING",))
    assert stream.push(1) == "Hel"
    assert stream.push(6) == ""  # " EN" could begin " ENDING"
    assert stream.push(5) == " EN!"  # it did not
    assert not stream.stopped


def test_a_stop_sequence_across_tokens_and_held_text_at_the_end():
    deltas, stream = _run([1, 2, 3, 4], stop=("o w",))
    assert "".join(deltas) == "Hell" and stream.stopped
    deltas, stream = _run([1, 2, 6], stop=(" END",))
    assert "".join(deltas) == "Hello EN"  # the end came first: the held text is the answer's


def test_an_incomplete_character_waits_for_the_rest():
    stream = TextStream(_decode)
    assert stream.push(1) == "Hel"
    assert stream.push(8) == ""  # ends with U+FFFD: bytes of a character still to come


def test_field_paths_name_nested_fields():
    assert field_path(("body", "messages", 0, "content", 1, "image_url", "url")) == (
        "messages[0].content[1].image_url.url"
    )
    assert field_path(("body", "temperature")) == "temperature"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"tools": []}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ],
)
def test_bad_chat_requests_are_refused_naming_the_field(body, field):
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(request)
    assert field_path(caught.value.errors()[0]["loc"]).startswith(field)


def test_a_completion_takes_one_prompt_and_defaults_to_16_tokens():
    assert CompletionRequest(model="m", prompt=["one"]).text == "one"
    assert CompletionRequest(model="m", prompt="one").token_limit == 16
    with pytest.raises(ValidationError, match="one prompt"):
        CompletionRequest(model="m", prompt=["one", "two"])


def _data_uri(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_data_uri_picture_is_decoded():
    picture = decode_image(_data_uri(Image.new("RGB", (8, 6), "green"), "PNG"), "url")
    assert picture.size == (8, 6) and picture.getpixel((0, 0)) == (0, 128, 0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.png", "fetches nothing from the internet"),
        ("file:///etc/passwd", "not fetched"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64,@@@", "base64 data is invalid"),
        ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "cannot be read"),
    ],
)
def test_other_image_urls_are_refused_with_the_reason(url, message):
    with pytest.raises(APIError) as caught:
        decode_image(url, "messages[0].content[1].image_url.url")
    assert caught.value.status == 400 and message in caught.value.message
    assert caught.value.param == "messages[0].content[1].image_url.url"


def test_pictures_in_other_formats_are_refused():
    gif = _data_uri(Image.new("RGB", (4, 4)), "GIF")
    with pytest.raises(APIError, match="GIF; send one of PNG, JPEG"):
        decode_image(gif, "url")
