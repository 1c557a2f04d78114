"""The FastAPI app: OpenAI-compatible endpoints, health, metrics, the dashboard's data, the page.

Requests are turned into token ids here and handed to the ``Scheduler``, which generates all of
them together; its events come back through an asyncio queue. A streamed reply waits for the
request's first event before it sends headers, so a request the swarm cannot serve at all gets
a proper status (503, naming the blocks nobody serves); a failure after that is an error event
inside the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from swarmllm.api.errors import APIError, bad_request, install_handlers, unavailable
from swarmllm.api.metrics import CountRequests, Metrics
from swarmllm.api.prompts import Prompt, chat_prompt, completion_prompt
from swarmllm.api.responses import ChatShape, CompletionShape, Shape, model_card
from swarmllm.api.scheduler import MAX_ACTIVE, Delta, Event, Failed, Finished, Job, Scheduler
from swarmllm.api.schemas import ChatCompletionRequest, CompletionRequest
from swarmllm.api.swarm_view import coverage_problem, swarm_status
from swarmllm.blocks.vision import ImageError
from swarmllm.client.drafting import check_speculative
from swarmllm.client.generation import GenerationConfig
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.routing import NoRouteError
from swarmllm.client.session import SessionFailedError
from swarmllm.security.validation import RequestLimits

logger = logging.getLogger("swarmllm.api")

# what peers accept by default (their --max-tokens-per-message, --max-session-length)
PEER_LIMITS = RequestLimits()
DEFAULT_CHAT_MAX_TOKENS = 512  # when a chat request sets no limit (and the context has room)
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there
SWARM_CALL_TIMEOUT = 30.0
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first
STATUS_MAX_AGE = 1.0  # seconds a dashboard snapshot serves further polls
STATIC = resources.files("swarmllm.api") / "static"


class ClientGone(Exception):
    """The HTTP client disconnected while its request was being generated."""


class ApiState:
    """What the endpoints share: the model, its scheduler, metrics and the accepted keys."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        api_keys: Sequence[str],
        metrics: Metrics,
        max_active: int = MAX_ACTIVE,
        speculative: str = "off",
    ):
        self.model, self.api_keys, self.metrics = model, tuple(api_keys), metrics
        self.speculative = speculative  # for every request (see client.generation)
        self.scheduler = Scheduler(model, metrics, max_active)
        model.tokenizer  # noqa: B018 - loaded once here, not by two threads at first use
        self.names = {model.source.name, model.model_id}
        self.takes_images = _takes_images(model)
        self._status: tuple[float, int, dict[str, Any]] | None = None  # (at, departures, view)
        self._status_lock = asyncio.Lock()

    async def on_swarm(self, coro, timeout: float = SWARM_CALL_TIMEOUT) -> Any:
        """Await a coroutine on the model's connection loop from the server's loop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.model.connection.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def status(self) -> dict[str, Any]:
        """The swarm as the dashboard shows it; the last reply's route is always current."""
        # many open pages share one snapshot a second, unless a request has left since: its
        # sessions are gone from the peers
        async with self._status_lock:
            departures = self.scheduler.departures
            if (
                self._status is None
                or time.monotonic() - self._status[0] > STATUS_MAX_AGE
                or self._status[1] != departures
            ):
                snapshot = await self.on_swarm(swarm_status(self.model))
                self._status = (time.monotonic(), departures, snapshot)
            route = [asdict(hop) for hop in self.scheduler.last_route]
            return {**self._status[2], "last_route": route, "takes_images": self.takes_images}


def create_app(
    model: DistributedModelForCausalLM,
    api_keys: Sequence[str] = (),
    max_active: int = MAX_ACTIVE,
    speculative: str = "off",
) -> FastAPI:
    """The server in front of ``model``'s swarm; starts and stops its scheduler with the app.
    ``max_active`` requests are generated together; later ones queue. ``speculative``: how
    every request decodes ("off", "lookup", or "draft" with the model's draft model)."""
    speculative = check_speculative(speculative, model.draft_model is not None)
    state = ApiState(model, api_keys, Metrics(), max_active, speculative)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.stop()

    app = FastAPI(title="swarmllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.api = state
    install_handlers(app)
    authorized = Depends(_key_check(state))

    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.get("/v1/models", dependencies=[authorized])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(model)]}

    @app.get("/v1/models/{name:path}", dependencies=[authorized])
    async def get_model(name: str) -> dict[str, Any]:
        _check_model(state, name)
        return model_card(model)

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        prompt = chat_prompt(model, body.messages)
        return await _complete(state, request, body, prompt, ChatShape(body))

    @app.post("/v1/completions", dependencies=[authorized])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        prompt = completion_prompt(model, body.text)
        return await _complete(state, request, body, prompt, CompletionShape(body))

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = await state.on_swarm(coverage_problem(model))
        if problem is not None:
            return unavailable(f"the swarm cannot serve {model.source.name}: {problem}").response()
        return JSONResponse({"status": "ok", "model": model.source.name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/swarm/status")
    async def dashboard_status() -> dict[str, Any]:
        return await state.status()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def serve(
    model: DistributedModelForCausalLM,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] = (),
    max_active: int = MAX_ACTIVE,
    speculative: str = "off",
) -> None:
    """Serve until SIGINT or SIGTERM. uvicorn shuts down gracefully on either, then raises the
    signal again under the handler it found: for SIGTERM that must be a no-op, so that this
    returns and the caller unwinds (its swarm and connection) instead of dying on the spot."""
    import uvicorn

    previous = signal.signal(signal.SIGTERM, _ignore)
    try:
        app = create_app(model, api_keys, max_active, speculative)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ignore(signum: int, frame: Any) -> None:
    pass


# ---------------------------------------------------------------- requests into jobs


def _key_check(state: ApiState) -> Callable:
    async def check(request: Request) -> None:
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )
        if not any(secrets.compare_digest(key.strip(), k) for k in state.api_keys):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    return check


def _check_model(state: ApiState, name: str) -> None:
    if name not in state.names:
        raise APIError(
            404,
            f"the model {name!r} does not exist here; this server serves "
            f"{state.model.source.name!r} (see GET /v1/models)",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )


def _settings(
    model: DistributedModelForCausalLM,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    speculative: str = "off",
) -> GenerationConfig:
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if prompt_len > PEER_LIMITS.max_tokens_per_message:
        # peers refuse longer messages, and a client bans a peer that refuses it
        raise bad_request(
            f"the prompt has {prompt_len} tokens; peers take at most "
            f"{PEER_LIMITS.max_tokens_per_message} in one message",
            param=prompt_param,
            code="context_length_exceeded",
        )
    context = min(
        getattr(model.config, "max_position_embeddings", None) or PEER_LIMITS.max_session_length,
        PEER_LIMITS.max_session_length,
    )
    room = context - prompt_len
    if room < 1:
        raise bad_request(
            f"the prompt has {prompt_len} tokens; the model's context holds {context}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    limit = body.token_limit
    if limit is None:
        limit = min(DEFAULT_CHAT_MAX_TOKENS, room)
    elif limit > room:
        chat_limit = getattr(body, "max_completion_tokens", None)
        param = "max_completion_tokens" if chat_limit else "max_tokens"
        raise bad_request(
            f"{param}={limit} with a {prompt_len}-token prompt exceeds the model's context of "
            f"{context} tokens (at most {room})",
            param=param,
            code="context_length_exceeded",
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    greedy = temperature == 0.0
    return GenerationConfig.build(
        model.generation_defaults,
        max_new_tokens=limit,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=None if greedy else body.top_p,
        seed=body.seed,
        speculative=speculative,
    )


async def _complete(
    state: ApiState,
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: Prompt,
    shape: Shape,
) -> Response:
    settings = _settings(state.model, body, prompt.ids.shape[1], state.speculative)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:  # called from the scheduler's thread
        with contextlib.suppress(RuntimeError):  # the server's loop has closed
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(prompt, settings, body.stop_sequences, sink)
    state.scheduler.submit(job)
    state.metrics.prompt_tokens.inc(prompt.ids.shape[1])
    try:
        first = await _next_event(events, request)
    except ClientGone:
        job.cancel()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, Failed):
        job.cancel()
        raise _api_error(first.error)
    if body.stream:
        return StreamingResponse(
            _stream(events, job, first, shape, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        text, event = "", first
        while not isinstance(event, Finished):
            if isinstance(event, Failed):
                raise _api_error(event.error)
            text += event.text
            event = await _next_event(events, request)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        job.cancel()  # a no-op once finished; frees the peers when the client went away
    return JSONResponse(shape.whole(text, event))


async def _next_event(events: asyncio.Queue[Event], request: Request | None) -> Event:
    """The next event, raising ``ClientGone`` as soon as the HTTP client disconnects (with
    ``request``; a streamed reply learns that from Starlette instead). The scheduler ends every
    job with an event within its round timeout."""
    while True:
        try:
            event: Event | None = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
        except asyncio.TimeoutError:
            event = None
        # checked after every event too: tokens may come faster than the poll period
        if request is not None and await request.is_disconnected():
            raise ClientGone()
        if event is not None:
            return event


async def _stream(
    events: asyncio.Queue[Event],
    job: Job,
    first: Event,
    shape: Shape,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE: a role chunk, content chunks, a finish chunk, maybe usage, then ``[DONE]``.
    Starlette cancels this generator when the client disconnects; ``finally`` ends the job."""
    try:
        if shape.opening_chunk:
            yield _sse(shape.chunk(None, None, include_usage, first=True))
        event = first
        while True:
            if isinstance(event, Delta):
                yield _sse(shape.chunk(event.text, None, include_usage))
            elif isinstance(event, Finished):
                yield _sse(shape.chunk(None, event.reason, include_usage))
                if include_usage:
                    yield _sse(shape.usage_chunk(event))
                break
            else:
                yield _sse(_api_error(event.error).body())
                break
            event = await _next_event(events, None)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _sse(data: dict[str, Any]) -> str:
    encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {encoded}\n\n"


def _api_error(error: BaseException) -> APIError:
    """A generation failure as the client should see it; the swarm's faults are 503s."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, NoRouteError):
        return unavailable(f"the swarm cannot serve this request: {error}")
    if isinstance(error, SessionFailedError):
        return unavailable(f"the swarm failed this request: {error}", code="swarm_failure")
    if isinstance(error, ImageError):
        return bad_request(str(error), param="messages")
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return unavailable(f"the swarm did not answer: {error}", code="swarm_failure")
    logger.error("request failed", exc_info=error)
    return APIError(500, f"internal error: {error}", type="server_error")


def _takes_images(model: DistributedModelForCausalLM) -> bool:
    try:
        model.image_encoder  # noqa: B018 - loads the encoder once, at start-up
    except ImageError:
        return False
    return True
