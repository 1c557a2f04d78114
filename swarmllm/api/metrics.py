"""Prometheus metrics of one server (its own registry, so several apps can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swarmllm_api_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "swarmllm_api_prompt_tokens", "prompt tokens of accepted requests", registry=r
        )
        self.completion_tokens = Counter(
            "swarmllm_api_completion_tokens", "tokens generated", registry=r
        )
        self.cancelled = Counter(
            "swarmllm_api_cancelled", "requests whose client went away mid-generation", registry=r
        )
        self.active = Gauge("swarmllm_api_active_requests", "requests being generated", registry=r)
        self.queued = Gauge(
            "swarmllm_api_queued_requests", "requests waiting for a place", registry=r
        )
        self.time_to_first_token = Histogram(
            "swarmllm_api_time_to_first_token_seconds",
            "from a request's arrival at the scheduler to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.peer_batch = Histogram(
            "swarmllm_api_peer_batch_size",
            "sessions in the peer's forward pass, per hop and step, as the peers report it",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """Pure ASGI middleware counting responses by route and status. (Starlette's
    ``BaseHTTPMiddleware`` would hide a client's disconnect from the endpoint, which must see it
    to free the swarm's sessions at once.)"""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                endpoint = getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
