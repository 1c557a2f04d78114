"""``DistributedModelForCausalLM``: embeddings, final norm and LM head here; blocks in the swarm."""

from __future__ import annotations

import asyncio
import functools
import uuid
import weakref
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from swarmllm.blocks.head import ModelHead
from swarmllm.blocks.placement import resolve_device
from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import ModelSource, resolve_model
from swarmllm.blocks.vision import (
    ImageEncoder,
    ImageError,
    ImageInputs,
    ImageLike,
)
from swarmllm.blocks.vision_factory import load_image_encoder
from swarmllm.client.bans import BanList
from swarmllm.client.chat import ChatSession
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.draft_model import DraftModel
from swarmllm.client.drafting import SpeculationStats, check_speculative
from swarmllm.client.generation import GenerationConfig, gather_or_cancel, generate_tokens
from swarmllm.client.hop import SessionSpec
from swarmllm.client.profile import Profile, measure, phase_of
from swarmllm.client.reputation import plausible_block_seconds
from swarmllm.client.router import Router
from swarmllm.client.routing import Hop
from swarmllm.client.session import FAILOVER_TIMEOUT, InferenceSession
from swarmllm.client.verification import SpotChecker, VerificationEvidence
from swarmllm.protocol import WIRE_DTYPES

DEFAULT_MAX_LENGTH = 2048


class ModelNotInSwarmError(LookupError):
    """No peer of the swarm announces any block of the requested model."""


class ClientSession:
    """A synchronous handle on an inference session; reusable across turns of a chat."""

    def __init__(self, model: DistributedModelForCausalLM, session: InferenceSession):
        self.model, self._session = model, session
        self.token_ids: torch.Tensor | None = None  # every token fed so far, for penalties
        self.speculation = SpeculationStats()  # of speculative decoding on this session

    @property
    def position(self) -> int:
        return self._session.position

    @property
    def failovers(self) -> int:
        """Hops replaced after a failure so far."""
        return self._session.failovers

    @property
    def route(self) -> list[Hop]:
        return self._session.route

    @property
    def max_length(self) -> int:
        return self._session.spec.max_length

    @property
    def batch(self) -> int:
        return self._session.spec.batch

    def rewind(self, position: int) -> None:
        """Forget every token from ``position`` on; the peers drop them at the next step."""
        self._session.rewind(position)

    @property
    def profile(self) -> Profile | None:
        return self.model.profile

    @property
    def evidence(self) -> list[VerificationEvidence]:
        """Spot-checks of this session that caught disagreeing signed outputs."""
        return self._session.evidence

    def step(
        self,
        hidden: torch.Tensor,
        position: int | None = None,
        images: ImageInputs | None = None,
    ) -> torch.Tensor:
        """Send hidden states (compute dtype) through the chain; returns the last hop's output.
        ``images`` (absolute positions) go to the first hop's adapter."""
        with measure(self.profile, phase_of(hidden.shape[1]), "swarm"):
            return self.model.connection.run(self.step_async(hidden, position, images))

    async def audit_async(self) -> None:
        """Spot-check every hop's whole history (with verification on); raises SessionRewound
        when a hop is caught lying (see ``InferenceSession.audit``)."""
        await self._session.audit()

    async def step_async(
        self,
        hidden: torch.Tensor,
        position: int | None = None,
        images: ImageInputs | None = None,
        phase: str | None = None,
    ) -> torch.Tensor:
        """``step`` on the connection's loop, to step several sessions together."""
        dtype = WIRE_DTYPES[self._session.spec.wire_dtype]
        wire_images = images.to(dtype) if images is not None else None
        output = await self._session.step(hidden.to(dtype), position, wire_images, phase)
        return output.to(hidden.dtype)

    def close(self) -> None:
        self.model.connection.run(self._session.close(), timeout=10)

    def __enter__(self) -> ClientSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DistributedModelForCausalLM:
    def __init__(
        self,
        source: ModelSource,
        head: ModelHead,
        connection: SwarmConnection,
        *,
        wire_dtype: str = "float32",
        allowed_peers: Collection[str] | None = None,
        step_timeout: float = 10.0,
        failover_timeout: float = FAILOVER_TIMEOUT,
        verify_signatures: bool = True,
        verify_fraction: float = 0.0,
        profile: bool = False,
        min_precision: str | None = None,
        draft_model: DraftModel | None = None,
    ):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        if not 0.0 <= verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be within [0, 1], got {verify_fraction}")
        self.source, self.head, self.connection = source, head, connection
        self.config = source.config
        self.generation_defaults = _generation_defaults(source)
        self.wire_dtype, self.step_timeout = wire_dtype, step_timeout
        # seconds one failover may search (and wait) for peers to take a hop's blocks over
        self.failover_timeout = failover_timeout
        self.verify_signatures = verify_signatures
        # the probability that each hop of each step is re-run on another peer and compared
        self.verify_fraction = verify_fraction
        # where the time goes, over every session of this model (see ``Profile.format``)
        self.profile: Profile | None = Profile() if profile else None
        self.bans = BanList()
        self.draft_model = draft_model  # drafts for speculative="draft"
        # route and spot-check only through peers computing at this precision or finer
        self.router = Router(
            connection,
            source.model_id,
            source.config.num_hidden_layers,
            self.bans,
            allowed_peers,
            min_precision=min_precision,
            min_block_seconds=plausible_block_seconds(source.config),
        )
        # closes the swarm connection when the model is garbage-collected or at exit, so a
        # model used without ``with`` leaves no pending tasks behind
        self._finalizer = weakref.finalize(self, connection.shutdown)

    @classmethod
    def from_pretrained(
        cls,
        model_ref: str | None = None,
        *,
        initial_peers: Sequence[str],
        dtype: torch.dtype = torch.float32,
        device: str = "auto",
        identity: str | Path | None = None,
        draft_model: str | None = None,
        **kwargs: Any,
    ) -> DistributedModelForCausalLM:
        """``identity``: this client's key file (created if missing), for private swarms whose
        peers list this client's peer id; default: a fresh key per connection. ``device``
        (auto|cpu|cuda[:N]|mps) holds the embeddings and LM head; ``min_precision`` (one of
        ``dht.records.PRECISIONS``) routes only through peers computing at least that finely.
        ``draft_model``: a small model with the same tokenizer (hub id or folder), held whole
        here, whose drafts ``speculative="draft"`` verifies."""
        where = resolve_device(device)  # fail before reading weights or joining the swarm
        source = resolve_model(model_ref)
        drafts = DraftModel.load(draft_model, source, dtype) if draft_model else None
        head = ModelHead.from_weights(source.config, source.weight_files(), dtype, where)
        connection = SwarmConnection(initial_peers, identity=identity)
        try:
            return cls(source, head, connection, draft_model=drafts, **kwargs)
        except BaseException:
            connection.shutdown()
            raise

    @functools.cached_property
    def tokenizer(self) -> Any:
        """Loaded on first use: generating from token ids needs none."""
        return self.source.load_tokenizer()

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def check_coverage(self) -> None:
        """Raise a clear error when the swarm lacks this model or some of its blocks."""
        coverage = self.connection.coverage(self.model_id, self.config.num_hidden_layers)
        if not coverage.peers():
            raise ModelNotInSwarmError(
                f"no peer in the swarm serves model {self.model_id} ({self.source.name})"
            )
        # a route proves that every block has a live, reachable peer (or names those without)
        self.connection.run(self.router.route(0, self.config.num_hidden_layers, min_cache_tokens=0))

    def inference_session(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch: int = 1,
        pad_lengths=None,
        *,
        images: bool = False,
    ) -> ClientSession:
        """An open session; with ``images`` its first hop serves this model's vision adapter."""
        adapter = self.image_encoder.adapter_name if images else None
        session = self.new_session(max_length, batch, pad_lengths, adapter=adapter)
        self.connection.run(session.open())
        return ClientSession(self, session)

    def new_session(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch: int = 1,
        pad_lengths=None,
        *,
        adapter: str | None = None,
    ) -> InferenceSession:
        """An unopened session for the async API (``await session.open()`` on
        ``connection.loop``), to drive several sessions from one event loop."""
        spec = SessionSpec(
            model_id=self.model_id,
            session_id=uuid.uuid4().hex,
            max_length=max_length,
            batch=batch,
            pad_lengths=tuple(pad_lengths)
            if pad_lengths is not None and any(pad_lengths)
            else None,
            wire_dtype=self.wire_dtype,
            step_timeout=self.step_timeout,
            verify_signatures=self.verify_signatures,
        )
        verifier = SpotChecker(self.router, self.verify_fraction) if self.verify_fraction else None
        return InferenceSession(
            self.router,
            spec,
            failover_timeout=self.failover_timeout,
            profile=self.profile,
            verifier=verifier,
            adapter=adapter,
        )

    @functools.cached_property
    def image_encoder(self) -> ImageEncoder:
        """The client's image encoder (loaded on first use); ImageError for a text-only model."""
        encoder = load_image_encoder(self.source)
        if encoder is None:
            raise ImageError(
                f"model {self.source.name} has no vision adapter: images need a LLaVA "
                "checkpoint or the embedded model with its shipped vision adapter"
            )
        return encoder

    def image_prompt(self, question: str, num_images: int = 1, chat: bool = True) -> torch.Tensor:
        """Token ids [1, n] asking ``question`` about images, with their placeholder tokens."""
        return self.image_encoder.prompt_ids(self.tokenizer, question, num_images, chat)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, images: Sequence[ImageLike] | None = None
    ) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for whole sequences (one prefill through the swarm);
        ``images`` fill the prompt's image placeholders."""
        inputs = self.image_encoder.image_inputs(input_ids, images) if images else None
        with self.inference_session(
            input_ids.shape[1], input_ids.shape[0], images=inputs is not None
        ) as session:
            return self.head.logits(session.step(self.head.embed(input_ids), images=inputs))

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        session: ClientSession | None = None,
        streamer: Any = None,
        images: Sequence[ImageLike] | None = None,
        **config: Any,
    ) -> torch.Tensor:
        """Generate like transformers' ``generate``: returns prompt + new tokens [batch, n].

        ``images`` (PIL pictures, or pixel tensors) fill the prompt's image placeholders
        (``image_prompt`` builds such a prompt); the image encoder runs here and only its
        features leave the client, for the first hop's adapter.

        ``config`` takes max_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, seed, eos_token_id, stop_strings and speculative ("off", the
        default; "lookup": drafts from the context; "draft": from the ``draft_model``; the
        drafts are verified several per step: the same greedy tokens, the same distribution
        when sampling). With ``session`` the prompt
        continues that session (multi-turn chat: pass only the new turn's tokens).
        ``streamer`` is any transformers streamer (``put``/``end``), e.g. ``TextStreamer``.
        """
        settings = self._settings(config)
        pad_lengths = _left_padding(input_ids, attention_mask)
        inputs = self.image_encoder.image_inputs(input_ids, images) if images else None
        if session is not None:
            if pad_lengths is not None:
                raise ValueError("padded prompts cannot continue an existing session")
            return self._generate([session], [input_ids], settings, [streamer], [inputs])[0]
        max_length = input_ids.shape[1] + settings.max_new_tokens
        with self.inference_session(
            max_length, input_ids.shape[0], pad_lengths, images=inputs is not None
        ) as own_session:
            return self._generate([own_session], [input_ids], settings, [streamer], [inputs])[0]

    def chat_session(
        self,
        system: str | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        images: bool = False,
        **generation: Any,
    ) -> ChatSession:
        """A multi-turn conversation on one session: ``chat.send(text)`` returns the reply and
        sends only the new turn's tokens. ``generation``: defaults for every turn (see
        ``ChatSession``)."""
        return ChatSession(self, system, max_length=max_length, images=images, **generation)

    def generate_text(self, prompt: str, *, chat: bool = True, **config: Any) -> str:
        """The text generated after ``prompt`` (in the chat template with ``chat``), without
        the prompt or special tokens. ``config`` is ``generate``'s."""
        input_ids = prompt_ids(self.tokenizer, prompt, chat=chat)
        output = self.generate(input_ids, **config)
        return self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    @torch.inference_mode()
    def generate_concurrently(
        self, prompts: Sequence[torch.Tensor], **config: Any
    ) -> list[torch.Tensor]:
        """Prompt + new tokens for each prompt ([rows, n] each, lengths may differ), each in
        its own session, stepped together so that peers batch them and the LM head runs once
        per step. ``config`` is ``generate``'s; each output equals ``generate``'s for it alone."""
        settings = self._settings(config)
        sessions = [
            ClientSession(self, self.new_session(p.shape[1] + settings.max_new_tokens, p.shape[0]))
            for p in prompts
        ]
        try:
            self.connection.run(gather_or_cancel(*(s._session.open() for s in sessions)))
            return self._generate(sessions, prompts, settings)
        finally:
            self.connection.run(_close_all(sessions), timeout=10)

    def _settings(self, config: dict[str, Any]) -> GenerationConfig:
        """``generate``'s keywords as settings, refused before any session opens if this
        client cannot generate that way."""
        settings = GenerationConfig.build(self.generation_defaults, **config)
        check_speculative(settings.speculative, self.draft_model is not None)
        return settings

    def _generate(
        self,
        sessions: Sequence[ClientSession],
        prompts: Sequence[torch.Tensor],
        settings: GenerationConfig,
        streamers: Sequence[Any] | None = None,
        images: Sequence[ImageInputs | None] | None = None,
    ) -> list[torch.Tensor]:
        return generate_tokens(
            self.head, sessions, prompts, settings, self._decode, streamers=streamers, images=images
        )

    def _decode(self, token_ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def shutdown(self) -> None:
        """Close the swarm connection (idempotent)."""
        self._finalizer()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


async def _close_all(sessions: Sequence[ClientSession]) -> None:
    await asyncio.gather(*(s._session.close() for s in sessions), return_exceptions=True)


def _left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int] | None:
    """Per-row count of left-padding tokens; raises on right padding."""
    if attention_mask is None:
        return None
    real = attention_mask.sum(dim=1)
    pads = (input_ids.shape[1] - real).tolist()
    for row, pad in enumerate(pads):  # the mask sums to the real tokens: they must end the row
        if not attention_mask[row, pad:].all():
            raise ValueError("prompts must be left-padded (set tokenizer.padding_side = 'left')")
    return pads if any(pads) else None


def _generation_defaults(source: ModelSource) -> transformers.GenerationConfig:
    """The checkpoint's generation_config.json (eos, pad), as transformers' generate uses it."""
    if (source.path / "generation_config.json").is_file():
        return transformers.GenerationConfig.from_pretrained(source.path)
    return transformers.GenerationConfig.from_model_config(source.config)
