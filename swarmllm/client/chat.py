"""Multi-turn chat over one inference session: each turn sends only its own new tokens.

The session's KV cache on the peers holds the whole conversation, so turn k costs a prefill of
turn k's tokens only. The tokens of a new turn are what the tokenizer's chat template adds for
it after the assistant's reply, which stays in the cache exactly as it was generated (its text
is never re-tokenized); its end-of-turn token counts as generated when the reply ended with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from swarmllm.blocks.vision import ImageLike

if TYPE_CHECKING:
    from swarmllm.client.model import ClientSession, DistributedModelForCausalLM

_REPLY = "\x00swarmllm-reply\x00"  # stand-ins, found again in the rendered template
_USER = "\x00swarmllm-user\x00"


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or one this module cannot extend turn by turn."""


class TurnTemplate:
    """Token ids of chat turns in a tokenizer's own chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("the model's tokenizer has no chat template")
        self.tokenizer = tokenizer

    def first(self, messages: list[dict[str, str]]) -> list[int]:
        """The whole prompt of a conversation's first user turn (with any system message)."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]

    def next(self, messages: list[dict[str, str]], user: str, reply_tokens: list[int]) -> list[int]:
        """The ids that follow ``reply_tokens`` (the last assistant message, as generated) for a
        new user turn ``user`` and the assistant's prompt. ``messages`` end with that reply."""
        text = self.suffix(messages)
        reply_end = self.tokenizer.decode(reply_tokens[-1:]) if reply_tokens else ""
        if reply_end and text.startswith(reply_end):
            text = text[len(reply_end) :]  # the reply's end-of-turn token was generated
        # the suffix starts at a special token (or after one), so alone it tokenizes as it
        # does inside the whole conversation
        return self.tokenizer(text.replace(_USER, user), add_special_tokens=False)["input_ids"]

    def suffix(self, messages: list[dict[str, str]]) -> str:
        """What the template renders after the last assistant message's content, for a new
        user turn (the stand-in ``_USER``) ready for the assistant's reply."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the conversation must end with the assistant's reply")
        stand_in = [*messages[:-1], {"role": "assistant", "content": _REPLY}]
        rendered = self.tokenizer.apply_chat_template(
            [*stand_in, {"role": "user", "content": _USER}],
            add_generation_prompt=True,
            tokenize=False,
        )
        if rendered.count(_REPLY) != 1 or rendered.count(_USER) != 1:
            raise ChatTemplateError("the chat template does not render each message once")
        return rendered[rendered.index(_REPLY) + len(_REPLY) :]


class ChatSession:
    """A conversation with the swarm; ``send`` returns each reply's text.

    ``with model.chat_session(system="Be brief.") as chat: chat.send("Hi!")``. ``generation``
    holds default settings for every turn (``max_new_tokens``, ``temperature``, ...), and
    ``send`` takes the same keywords for one turn. ``max_length`` bounds the whole
    conversation (its KV cache on every peer). ``images``: open the session on a first hop
    that serves the vision adapter (a first turn with images does so by itself; "reset" the
    chat to add images later).
    """

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        system: str | None = None,
        *,
        max_length: int = 2048,
        images: bool = False,
        **generation: Any,
    ):
        self.model, self.system, self.max_length = model, system, max_length
        self.images = images  # whether the session's first hop serves the vision adapter
        self.generation = {"max_new_tokens": 256, **generation}
        self.template = TurnTemplate(model.tokenizer)
        self.messages: list[dict[str, str]] = []  # the system message, then each turn's
        self._reply_tokens: list[int] = []
        self._session: ClientSession | None = None
        self.reset()

    @property
    def session(self) -> ClientSession:
        """The open inference session that holds the conversation."""
        if self._session is None:
            raise RuntimeError("the chat session is closed")
        return self._session

    @property
    def token_ids(self) -> torch.Tensor | None:
        """Every token of the conversation so far [1, n] (None before the first turn)."""
        return self._session.token_ids if self._session is not None else None

    def send(
        self,
        text: str,
        *,
        images: Sequence[ImageLike] | None = None,
        streamer: Any = None,
        **config: Any,
    ) -> str:
        """Add a user turn (about ``images``, if given), generate the reply, return its text."""
        if self._session is None:
            raise RuntimeError("the chat session is closed")
        content = text
        if images and not self.images:
            if self._reply_tokens:
                raise ValueError(
                    "this chat session was opened without images; reset it to send one"
                )
            self.images = True
            self.reset()
        if images:
            encoder = self.model.image_encoder
            marker = self.model.tokenizer.convert_ids_to_tokens(encoder.image_token_id)
            content = marker * len(images) + "\n" + text
        if self._reply_tokens:
            ids = self.template.next(self.messages, content, self._reply_tokens)
        else:
            ids = self.template.first([*self.messages, {"role": "user", "content": content}])
        if images:
            ids = _expand_placeholders(ids, encoder.image_token_id, encoder.tokens_per_image)
        settings = {**self.generation, **config}
        held = 0 if self.token_ids is None else self.token_ids.shape[1]
        if held + len(ids) + settings["max_new_tokens"] > self.max_length:
            raise ValueError(
                f"the conversation would exceed its {self.max_length} tokens; reset it or "
                "start a chat session with a larger max_length"
            )
        prompt = torch.tensor([ids])
        output = self.model.generate(
            prompt, session=self._session, streamer=streamer, images=images, **settings
        )
        self._reply_tokens = output[0, prompt.shape[1] :].tolist()
        reply = self.model.tokenizer.decode(self._reply_tokens, skip_special_tokens=True)
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and start a fresh session."""
        self.close()
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._reply_tokens = []
        self._session = self.model.inference_session(self.max_length, images=self.images)

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _expand_placeholders(ids: list[int], token_id: int, count: int) -> list[int]:
    """Each ``token_id`` in ``ids`` repeated ``count`` times (one per image feature)."""
    expanded: list[int] = []
    for token in ids:
        expanded += [token] * count if token == token_id else [token]
    return expanded
