"""The spot-check verdict: who is outvoted, and the distance used to compare outputs."""

from __future__ import annotations

import pytest
import torch

from swarmllm.client.verification import TOLERANCES, outliers, relative_error

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


def test_the_half_precision_tolerances_are_looser() -> None:
    assert TOLERANCES["float32"] < TOLERANCES["float16"] < TOLERANCES["bfloat16"] < 1
