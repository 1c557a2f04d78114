"""Per-session KV caches held within a token budget, shared fairly between clients.

A session is one inference stream, keyed by (client peer id, stream id): the client chooses the
stream id, so one client's ids can never collide with, or be taken by, another client's. A
session reserves ``max_length × batch`` cache tokens at open (its cache is allocated at exactly
that size), and one client may reserve at most ``max_tokens_per_peer`` of the budget and hold at
most ``max_sessions_per_peer`` sessions. The stream that owns a session ends it (and frees its
cache) when the client goes idle too long or the session outlives its lifetime.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from swarmllm.blocks.kv_cache import KVCache
from swarmllm.blocks.span import BlockSpan


class BusyError(RuntimeError):
    """The peer has no room for another session right now; the client should route elsewhere."""


SessionKey = tuple[str, str]  # (client peer id, stream id)


@dataclass
class Session:
    stream_id: str
    remote_peer: str
    nonce: bytes
    start: int
    end: int
    max_length: int
    batch: int
    wire_dtype: torch.dtype
    span: BlockSpan  # the layers it runs through, kept while the peer moves elsewhere
    cache: KVCache
    pad_lengths: tuple[int, ...] | None = None  # as the client sent them (signed)
    pad_tensor: torch.Tensor | None = None  # for the span; None when no row is padded
    last_step: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    # when the peer moved off its blocks: the time by which it must end (``time.monotonic``)
    drain_by: float = float("inf")

    @property
    def key(self) -> SessionKey:
        return self.remote_peer, self.stream_id

    @property
    def reserved_tokens(self) -> int:
        """What the cache holds at most: every row padded to the longest (rows × max length)."""
        return self.max_length * self.batch


class SessionRegistry:
    """Reserves ``max_length × batch`` cache tokens per session at open; refuses what won't fit."""

    def __init__(
        self,
        cache_tokens: int,
        max_sessions: int,
        max_sessions_per_peer: int,
        max_tokens_per_peer: int | None = None,
    ):
        self.cache_tokens, self.max_sessions = cache_tokens, max_sessions
        self.max_sessions_per_peer = max_sessions_per_peer
        self.max_tokens_per_peer = max_tokens_per_peer or max(1, cache_tokens // 2)
        self._sessions: dict[SessionKey, Session] = {}
        self._lock = threading.Lock()

    @property
    def tokens_left(self) -> int:
        with self._lock:
            return self.cache_tokens - sum(s.reserved_tokens for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session: Session) -> None:
        """Admit ``session``; BusyError when it does not fit, ValueError when its key is taken
        (the same client reusing one of its own stream ids)."""
        with self._lock:
            if session.key in self._sessions:
                raise ValueError(f"stream {session.stream_id!r} of this client is already open")
            used = sum(s.reserved_tokens for s in self._sessions.values())
            if used + session.reserved_tokens > self.cache_tokens:
                raise BusyError(
                    f"busy: the session needs {session.reserved_tokens} cache tokens, "
                    f"{self.cache_tokens - used} of {self.cache_tokens} are free"
                )
            if len(self._sessions) >= self.max_sessions:
                raise BusyError(f"busy: all {self.max_sessions} session slots are taken")
            own = [s for s in self._sessions.values() if s.remote_peer == session.remote_peer]
            if len(own) >= self.max_sessions_per_peer:
                raise BusyError(
                    f"busy: peer {session.remote_peer} already holds "
                    f"{self.max_sessions_per_peer} sessions (the per-peer limit)"
                )
            held = sum(s.reserved_tokens for s in own)
            if held + session.reserved_tokens > self.max_tokens_per_peer:
                raise BusyError(
                    f"busy: peer {session.remote_peer} holds {held} cache tokens and asks for "
                    f"{session.reserved_tokens} more; one client may hold "
                    f"{self.max_tokens_per_peer} (the per-peer share)"
                )
            self._sessions[session.key] = session

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def get(self, key: SessionKey) -> Session | None:
        return self._sessions.get(key)

    def close(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]
