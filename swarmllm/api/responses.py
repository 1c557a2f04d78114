"""The OpenAI response bodies of the chat and completion endpoints, whole or as stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from swarmllm.api.scheduler import Finished

if TYPE_CHECKING:
    from swarmllm.api.schemas import ChatCompletionRequest, CompletionRequest
    from swarmllm.client.model import DistributedModelForCausalLM


def model_card(model: DistributedModelForCausalLM) -> dict[str, Any]:
    return {"id": model.source.name, "object": "model", "created": 0, "owned_by": "swarmllm"}


def _usage(event: Finished) -> dict[str, int]:
    total = event.prompt_tokens + event.completion_tokens
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": total,
    }


class Shape:
    """The OpenAI body of one endpoint, whole or as stream chunks."""

    object: str
    chunk_object: str
    prefix: str
    opening_chunk = False  # a first chunk before any text (chat: the assistant's role)

    def __init__(self, body: ChatCompletionRequest | CompletionRequest):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = body.model

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        choice = {"index": 0, **self._whole_choice(text), "finish_reason": finished.reason}
        return {**self._envelope(self.object), "choices": [choice], "usage": _usage(finished)}

    def chunk(
        self, text: str | None, reason: str | None, include_usage: bool, first: bool = False
    ) -> dict[str, Any]:
        choice = {"index": 0, **self._chunk_choice(text, first), "finish_reason": reason}
        body = {**self._envelope(self.chunk_object), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object), "choices": [], "usage": _usage(finished)}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(self, text: str | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError


class ChatShape(Shape):
    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"
    opening_chunk = True

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}, "logprobs": None}

    def _chunk_choice(self, text: str | None, first: bool) -> dict[str, Any]:
        if first:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {} if text is None else {"content": text}
        return {"delta": delta, "logprobs": None}


class CompletionShape(Shape):
    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return {"text": text, "logprobs": None}

    def _chunk_choice(self, text: str | None, first: bool) -> dict[str, Any]:
        return {"text": text or "", "logprobs": None}
