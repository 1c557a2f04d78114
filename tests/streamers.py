"""A streamer for generate() that acts on a peer at a chosen token: the failover tests' trigger."""

from __future__ import annotations

from collections.abc import Callable

import torch


class AfterTokens:
    """A streamer that runs ``action`` once the ``n``-th new token has been produced."""

    def __init__(self, n: int, action: Callable[[], None]):
        self.n, self.action, self.seen = n, action, -1  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.action()

    def end(self) -> None:
        pass
