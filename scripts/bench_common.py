"""What every benchmark script shares: machine facts, token timing, and writing the report."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "machine": machine_info()}, indent=2))


class TokenClock:
    """A transformers-style streamer that timestamps every new token (the first ``put`` is
    the prompt)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    @property
    def time_to_first_token(self) -> float:
        return self.token_times[0] - self.started

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time after the first."""
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    @property
    def longest_gap(self) -> float:
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]
        return max(gaps, default=0.0)
