"""Per-session KV caches held within a token budget, with idle expiry."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from swarmllm.blocks.kv_cache import KVCache


class BusyError(RuntimeError):
    """The peer has no room for another session right now; the client should route elsewhere."""


@dataclass
class Session:
    session_id: str
    remote_peer: str
    start: int
    end: int
    max_length: int
    batch: int
    wire_dtype: torch.dtype
    cache: KVCache
    pad_lengths: torch.Tensor | None = None
    last_step: int = -1
    last_used: float = field(default_factory=time.monotonic)

    @property
    def reserved_tokens(self) -> int:
        return self.max_length * self.batch


class SessionRegistry:
    """Reserves ``max_length × batch`` cache tokens per session at open; refuses what won't fit."""

    def __init__(self, cache_tokens: int, max_sessions: int, max_sessions_per_peer: int):
        self.cache_tokens, self.max_sessions = cache_tokens, max_sessions
        self.max_sessions_per_peer = max_sessions_per_peer
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def tokens_left(self) -> int:
        with self._lock:
            return self.cache_tokens - sum(s.reserved_tokens for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session: Session) -> None:
        with self._lock:
            if session.session_id in self._sessions:
                raise ValueError(f"session {session.session_id!r} is already open")
            used = sum(s.reserved_tokens for s in self._sessions.values())
            if used + session.reserved_tokens > self.cache_tokens:
                raise BusyError(
                    f"busy: the session needs {session.reserved_tokens} cache tokens, "
                    f"{self.cache_tokens - used} of {self.cache_tokens} are free"
                )
            if len(self._sessions) >= self.max_sessions:
                raise BusyError(f"busy: all {self.max_sessions} session slots are taken")
            per_peer = Counter(s.remote_peer for s in self._sessions.values())
            if per_peer[session.remote_peer] >= self.max_sessions_per_peer:
                raise BusyError(
                    f"busy: peer {session.remote_peer} already holds "
                    f"{self.max_sessions_per_peer} sessions (the per-peer limit)"
                )
            self._sessions[session.session_id] = session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def expire_idle(self, idle_timeout: float) -> list[str]:
        """Close sessions unused for ``idle_timeout`` seconds; return their ids."""
        now = time.monotonic()
        with self._lock:
            expired = [s for s, v in self._sessions.items() if now - v.last_used > idle_timeout]
            for session_id in expired:
                del self._sessions[session_id]
        return expired
