"""LwF distillation penalty: naive reference, gradient, detached teacher, errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deltaft.regularizers.functional import distillation_penalty
from tests.reference import ref_distillation_penalty


def _logits(seed: int, shape: tuple[int, int] = (5, 7)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 10])
def test_matches_naive_per_sample_loop(temperature: float) -> None:
    s, t = _logits(0), _logits(1)
    got = distillation_penalty(s, t, temperature)
    assert_close(got, ref_distillation_penalty(s, t, temperature))


def test_zero_for_equal_logits_and_positive_otherwise() -> None:
    s = _logits(0)
    assert float(distillation_penalty(s, s.clone(), 2.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(distillation_penalty(s, _logits(1), 2.0)) > 0


def test_gradcheck_wrt_student() -> None:
    s = _logits(0, (3, 4)).requires_grad_(True)
    t = _logits(1, (3, 4))
    assert torch.autograd.gradcheck(lambda x: distillation_penalty(x, t, 2.5), (s,))
    assert torch.autograd.gradgradcheck(lambda x: distillation_penalty(x, t, 2.5), (s,))


def test_gradient_is_t_over_b_times_q_minus_p() -> None:
    temperature, s = 3.0, _logits(0).requires_grad_(True)
    t = _logits(1)
    distillation_penalty(s, t, temperature).backward()
    q = torch.softmax(s.detach() / temperature, dim=1)
    p = torch.softmax(t / temperature, dim=1)
    assert s.grad is not None
    assert_close(s.grad, temperature / s.shape[0] * (q - p))


def test_teacher_is_detached() -> None:
    s = _logits(0).requires_grad_(True)
    t = _logits(1).requires_grad_(True)
    distillation_penalty(s, t, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None


def test_equals_peer_kl_divergence_times_t_squared() -> None:
    s, t, temperature = _logits(0), _logits(1), 3.0
    kl = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s / temperature, dim=-1), torch.softmax(t / temperature, dim=-1)
    )
    assert_close(distillation_penalty(s, t, temperature), kl * temperature**2)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True])
def test_temperature_must_be_finite_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        distillation_penalty(_logits(0), _logits(1), temperature)


@pytest.mark.parametrize(
    ("student", "teacher"),
    [((5, 7), (5, 6)), ((5, 7), (4, 7)), ((2, 5, 7), (2, 5, 7))],
)
def test_shapes_must_match_and_be_2d(student: tuple[int, ...], teacher: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"same \(B, K\) shape"):
        distillation_penalty(torch.zeros(student), torch.zeros(teacher), 2.0)


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="non-empty batch"):
        distillation_penalty(torch.zeros(0, 3), torch.zeros(0, 3), 2.0)
