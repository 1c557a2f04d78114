"""Ctrl-C at any moment: one line, the swarm sessions closed on the way out, exit code 130."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

# how long a Ctrl-C that arrived inside an import waits before it is tried again
IMPORT_RETRY_S = 0.05


def _inside_import(frame: FrameType | None) -> bool:
    """Whether Python is running a module's top-level code. An import may have been started by
    C++ (torch's extensions import Python modules while they initialise), and a
    KeyboardInterrupt raised there goes through C++ that cannot carry it: the process aborts."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _inside_import(frame):
        # deliver it again once the import is over (imports end in seconds)
        retry = threading.Timer(IMPORT_RETRY_S, os.kill, (os.getpid(), signal.SIGINT))
        retry.daemon = True
        retry.start()
        return
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
