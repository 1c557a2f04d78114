"""Shared fixtures: the embedded model (resolved once per run) and tiny random models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from model_factory import save_tiny_model

from swarmllm.blocks.placement import CPU_BF16_ENV
from swarmllm.blocks.sources import ModelSource, resolve_model

# The swarm tests compare with transformers in float32, and peers (child processes inherit
# this) compute in float32 under ``--dtype auto`` only where the CPU lacks fast bfloat16: pin
# it, so the suite means the same on every CPU. Tests of bfloat16 ask for it by name.
os.environ.setdefault(CPU_BF16_ENV, "0")


@pytest.fixture(scope="session")
def embedded_source() -> ModelSource:
    """The embedded SmolLM2 model, converted into $SWARMLLM_CACHE (or the default cache) once."""
    return resolve_model(progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``make(family)`` writes a tiny random model of that family once and returns its folder."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(family, tmp_path_factory.mktemp(family))
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_source(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], ModelSource]:
    """``make(family)`` resolves the tiny model of that family like any local model directory."""
    hash_cache = tmp_path_factory.mktemp("swarmllm-cache")  # keeps the user's hash memo clean
    return lambda family: resolve_model(tiny_model_dir(family), cache_dir=hash_cache)


@pytest.fixture(scope="session")
def llama(tiny_source: Callable[[str], ModelSource]) -> ModelSource:
    """The tiny Llama model that the swarm tests serve."""
    return tiny_source("llama")
