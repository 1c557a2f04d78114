"""The spot-check verdict: who is outvoted, and the distance used to compare outputs."""

from __future__ import annotations

import pytest
import torch

from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.verification import (
    TOLERANCES,
    outliers,
    relative_error,
    token_errors,
    tolerance_for,
    wire_rounding,
)
from swarmllm.dht.records import PeerRecord, PeerState

TOLERANCE = TOLERANCES["float32"]


@pytest.fixture
def right() -> torch.Tensor:
    return torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))


def test_relative_error_is_per_token_and_symmetric(right: torch.Tensor) -> None:
    wrong = right.clone()
    wrong[0, 2] *= 1.5  # one token off by half its norm
    assert relative_error(right, right) == 0.0
    assert relative_error(right, wrong) == pytest.approx(0.5 / 1.5)
    assert relative_error(wrong, right) == relative_error(right, wrong)
    # a tiny token cannot hide behind big ones: each token is compared on its own scale
    small = right.clone()
    small[0, 0] *= 1e-3
    changed = small.clone()
    changed[0, 0] *= 2
    assert relative_error(small, changed) == pytest.approx(0.5)


def test_honest_rounding_passes_and_noise_does_not(right: torch.Tensor) -> None:
    rounding = right * (1 + 1e-6 * torch.randn_like(right))
    noise = right + 0.05 * torch.randn_like(right)
    assert not outliers({"a": right, "b": rounding}, TOLERANCE)
    assert outliers({"a": right, "b": noise}, TOLERANCE) == {"a", "b"}


def test_a_third_answer_settles_a_disagreement(right: torch.Tensor) -> None:
    wrong = right + 0.1
    assert outliers({"checked": wrong, "verifier": right, "third": right}, TOLERANCE) == {"checked"}
    assert outliers({"checked": right, "verifier": wrong, "third": right}, TOLERANCE) == {
        "verifier"
    }
    # three different answers: nobody can be trusted
    assert outliers({"a": right, "b": right + 0.1, "c": right - 0.1}, TOLERANCE) == {"a", "b", "c"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tolerance_passes_honest_rounding_and_catches_tampering(
    llama: ModelSource, dtype: torch.dtype
) -> None:
    """A spot-check compares a peer's cached decode steps with a verifier's stateless forward
    over the whole sequence: they round differently, but must agree within the dtype's
    tolerance, while the noise ``tampering_peer.py`` adds must not."""
    span = BlockSpan.from_weights(llama.config, llama.weight_files(), 0, 2, dtype)
    inputs = torch.randn(
        1, 24, llama.config.hidden_size, generator=torch.Generator().manual_seed(3)
    )
    inputs = inputs.to(dtype)
    cache = span.new_cache()
    cached = [span(inputs[:, :16], cache)]
    cached += [span(inputs[:, t : t + 1], cache) for t in range(16, 24)]
    stepped = torch.cat(cached, dim=1)
    stateless = span(inputs)
    tolerance = TOLERANCES[str(dtype).removeprefix("torch.")]
    assert relative_error(stepped, stateless) <= tolerance
    if dtype == torch.float32:
        tampered = stepped + 0.05 * torch.randn(stepped.shape, generator=torch.Generator())
        assert relative_error(tampered, stateless) > tolerance


def test_the_answering_peers_precision_plus_the_wire_rounding_sets_the_tolerance(
    right: torch.Tensor,
) -> None:
    def record(dtype: str) -> PeerRecord:
        return PeerRecord(PeerState.ONLINE, 0, 1, 1.0, 1, "0.1.0", dtype)

    f32 = {"a": record("float32"), "b": record("float32")}
    mixed = {"a": record("float32"), "b": record("bfloat16")}
    answers = {"a": right, "b": right}

    def tolerance(precision: str, wire: torch.dtype = torch.float32) -> float:
        return TOLERANCES[precision] + wire_rounding(wire, TOLERANCES[precision])

    assert tolerance_for(torch.float32, answers, f32) == tolerance("float32")
    assert tolerance_for(torch.float16, answers, f32) == tolerance("float32", torch.float16)
    assert tolerance_for(torch.float32, answers, mixed) == tolerance("bfloat16")
    # a peer that did not answer does not loosen the comparison of those that did
    assert tolerance_for(torch.float32, {"a": right}, mixed) == tolerance("float32")
    # rounding moves an element by one ulp at most
    assert wire_rounding(torch.bfloat16, 1.0) == 1.5 * torch.finfo(torch.bfloat16).eps


def test_a_bfloat16_wire_between_float32_peers_catches_scaling_and_noise(llama) -> None:
    """Both answers come rounded to the wire dtype: that rounding, not bfloat16 compute, is the
    honest difference. A peer scaling its output by 2% stayed inside the bfloat16 compute
    tolerance (1e-1) that the wire used to get, and noise of 1% of each token's norm inside a
    worst-case bound of two unit roundoffs (1.3e-2); the wire's bound catches both, and honest
    cached steps against a stateless forward stay inside it."""
    span = BlockSpan.from_weights(llama.config, llama.weight_files(), 0, 3)
    inputs = torch.randn(
        1, 20, llama.config.hidden_size, generator=torch.Generator().manual_seed(5)
    )
    inputs = inputs.to(torch.bfloat16).float()  # what the hop and the verifier both receive
    cache = span.new_cache()
    stepped = torch.cat(
        [span(inputs[:, :12], cache), *(span(inputs[:, t : t + 1], cache) for t in range(12, 20))],
        dim=1,
    )
    stateless = span(inputs)
    honest, verifier = stepped.to(torch.bfloat16), stateless.to(torch.bfloat16)
    scaled = (1.02 * stepped).to(torch.bfloat16)
    noise = torch.randn(stepped.shape, generator=torch.Generator().manual_seed(6))
    noise *= 0.01 * stepped.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
    noisy = (stepped + noise).to(torch.bfloat16)
    fp32 = {"liar": PeerRecord(PeerState.ONLINE, 0, 3, 1.0, 1, "0.1.0", "float32")}
    fp32["verifier"] = fp32["liar"]
    tolerance = tolerance_for(torch.bfloat16, {"liar": scaled, "verifier": verifier}, fp32)
    assert relative_error(honest, verifier) <= tolerance
    assert relative_error(scaled, verifier) > tolerance
    assert token_errors(noisy, verifier).min() > tolerance  # every token is caught
