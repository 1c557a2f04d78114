"""Ctrl-C at any moment: one line, the swarm sessions closed on the way out, exit code 130."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator


def _interrupt(signum: int, frame: object) -> None:
    # later Ctrl-Cs must not break the clean-up the first one started (it is bounded in time)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGINT into KeyboardInterrupt, let ``with`` blocks close what they hold
    (sessions, the swarm connection), then print one line; the caller returns 130."""
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
