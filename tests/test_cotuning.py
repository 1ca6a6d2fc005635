"""Co-Tuning: both relationship estimators on toy sources with known predictions; loss; errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from deltaft import cotuning as CT
from tests.reference import ref_bayes_relationship, ref_cotuning_loss, ref_direct_relationship

# A toy source with known predictions: logits = log(probabilities), so softmax gives them back.
_PROBS = torch.tensor(
    [
        [0.7, 0.2, 0.1],
        [0.5, 0.4, 0.1],  # class 0: mean (0.6, 0.3, 0.1)
        [0.1, 0.1, 0.8],
        [0.3, 0.1, 0.6],  # class 1: mean (0.2, 0.1, 0.7)
        [0.2, 0.6, 0.2],  # class 2: (0.2, 0.6, 0.2)
    ],
    dtype=torch.float64,
)
_LABELS = torch.tensor([0, 0, 1, 1, 2])


def test_direct_relationship_by_hand() -> None:
    got = CT.direct_relationship(_PROBS.log(), _LABELS, num_classes=3)
    want = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.2, 0.6, 0.2]], dtype=torch.float64)
    assert_close(got, want)
    assert got.shape == (3, 3) and got.dtype == torch.float64


def _toy(seed: int, n: int, classes: int = 3, source: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Target class c looks like source class 2c to the source network, with noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    logits = torch.randn(n, source, generator=gen)
    logits[torch.arange(n), 2 * labels] += 4.0
    return logits, labels


def test_direct_relationship_matches_loop_and_rows_sum_to_one() -> None:
    logits, labels = _toy(0, 30)
    got = CT.direct_relationship(logits, labels, 3)
    assert_close(got, ref_direct_relationship(logits.double(), labels, 3))
    assert_close(got.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_logit_scale_multiplies_the_logits() -> None:
    logits, labels = _toy(0, 30)
    assert_close(
        CT.direct_relationship(logits, labels, 3, logit_scale=CT.RESNET50_LOGIT_SCALE),
        ref_direct_relationship(logits.double() * CT.RESNET50_LOGIT_SCALE, labels, 3),
    )


def test_reverse_is_bayes_on_the_first_best_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    (train, y_train), (val, y_val) = _toy(0, 30), _toy(1, 15)
    good = torch.zeros(3, 6, dtype=torch.float64)
    good[torch.arange(3), 2 * torch.arange(3)] = 5.0  # predicts every class right
    weights = {10.0: torch.zeros(3, 6, dtype=torch.float64), 3.0: good, 1.0: 2 * good}
    monkeypatch.setattr(CT, "_fit_logistic_regression", lambda x, y, k, c: weights[c])
    got = CT.reverse_relationship(train, y_train, val, y_val, 3, c_grid=(10.0, 3.0, 1.0))
    p_train, p_val = train.double().softmax(1), val.double().softmax(1)
    scale = CT._calibrate(p_val @ good.T, y_val)  # 3.0 and 1.0 tie on accuracy: the first wins
    want = ref_bayes_relationship(good, scale, torch.cat([p_train, p_val]))
    assert_close(got, want)


def test_calibration_minimises_the_validation_nll() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    labels = (logits + 0.8 * torch.randn(40, 3, generator=gen, dtype=torch.float64)).argmax(1)
    scale = CT._calibrate(logits, labels)
    grid = torch.linspace(0.01, 10, 2000, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits * s, labels) for s in grid])
    assert scale == pytest.approx(float(grid[nll.argmin()]), abs=0.01)


@pytest.mark.parametrize("c", [0.1, 1.0, 30.0])
def test_logistic_regression_matches_scikit_learn(c: float) -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    logits, labels = _toy(0, 60)
    x = logits.double().softmax(1)
    got = CT._fit_logistic_regression(x, labels, 3, c)
    fit = linear_model.LogisticRegression(C=c, fit_intercept=False, tol=1e-12, max_iter=10000)
    fit.fit(x.numpy(), labels.numpy())
    want = torch.from_numpy(fit.coef_)

    def objective(w: torch.Tensor) -> float:  # scikit-learn's, divided by c * N
        ce = torch.nn.functional.cross_entropy(x @ w.T, labels)
        return float(ce + 0.5 / (c * len(x)) * w.pow(2).sum())

    # The minimum is flat: the objectives agree to 1e-10, the weights to the solvers' tolerance.
    assert objective(got) == pytest.approx(objective(want), abs=1e-10)
    assert_close(got, want, atol=1e-3, rtol=0)


def test_reverse_finds_the_matching_source_class() -> None:
    (train, y_train), (val, y_val) = _toy(0, 60), _toy(1, 30)
    got = CT.reverse_relationship(train, y_train, val, y_val, 3, c_grid=(1.0, 0.1))
    assert got.shape == (3, 6) and got.dtype == torch.float64
    assert_close(got.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert got.argmax(dim=1).tolist() == [0, 2, 4]


@pytest.mark.slow
def test_reverse_with_the_authors_grid() -> None:
    (train, y_train), (val, y_val) = _toy(0, 60), _toy(1, 30)
    got = CT.estimate_relationship(train, y_train, 3, val_logits=val, val_labels=y_val)
    assert_close(got.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert got.argmax(dim=1).tolist() == [0, 2, 4]


def test_estimate_direct_uses_validation_rows_too() -> None:
    (train, y_train), (val, y_val) = _toy(0, 30), _toy(1, 15)
    got = CT.estimate_relationship(train, y_train, 3, "direct", val, y_val)
    want = CT.direct_relationship(torch.cat([train, val]), torch.cat([y_train, y_val]), 3)
    assert_close(got, want)
    assert_close(
        CT.estimate_relationship(train, y_train, 3, "direct"),
        CT.direct_relationship(train, y_train, 3),
    )


def test_cotuning_loss_matches_loop_and_gradient_flows_to_logits_only() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    relationship = CT.direct_relationship(_PROBS.log(), _LABELS, 3).requires_grad_(True)
    labels = torch.tensor([2, 0, 1, 0])
    got = CT.cotuning_loss(logits, labels, relationship)
    assert_close(got, ref_cotuning_loss(logits.detach(), labels, relationship.detach()))
    got.backward()
    assert logits.grad is not None and relationship.grad is None
    want = (logits.detach().softmax(1) - relationship.detach()[labels]) / 4
    assert_close(logits.grad, want)


def test_cotuning_loss_casts_the_relationship() -> None:
    relationship = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    got = CT.cotuning_loss(torch.zeros(2, 2), torch.tensor([0, 0]), relationship)
    assert got.dtype == torch.float32


_Z, _Y = _toy(0, 12)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((_Z[0], _Y, 3), r"Expected training source logits \(N, K\) and labels \(N,\)"),
        ((_Z, _Y[:5], 3), r"Expected training source logits \(N, K\)"),
        ((_Z, _Y + 1, 3), r"Training labels must be in \[0, 3\), got values from 1 to 3"),
        ((_Z, _Y, 4), r"Target classes \[3\] have no training samples"),
    ],
)
def test_direct_relationship_errors(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CT.direct_relationship(*args)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), True])
def test_logit_scale_errors(scale: float) -> None:
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        CT.direct_relationship(_Z, _Y, 3, logit_scale=scale)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_logits": _Z[:, :5]}, "Training logits have 6 source classes, validation logits 5"),
        ({"val_labels": _Y - 1}, r"Validation labels must be in \[0, 3\)"),
        ({"c_grid": ()}, "c_grid must be non-empty with finite values > 0"),
        ({"c_grid": (1.0, -1.0)}, "c_grid must be non-empty"),
    ],
)
def test_reverse_relationship_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"val_logits": _Z, "val_labels": _Y, "c_grid": (1.0,), **kwargs}
    with pytest.raises(ValueError, match=match):
        CT.reverse_relationship(_Z, _Y, num_classes=3, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_logits": _Z}, "Give both val_logits and val_labels, or neither"),
        ({}, "'reverse' relationship picks .* pass val_logits and val_labels"),
        ({"method": "inverse"}, "method must be 'reverse' or 'direct', got 'inverse'"),
    ],
)
def test_estimate_relationship_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CT.estimate_relationship(_Z, _Y, 3, **kwargs)


_R = torch.full((3, 6), 1 / 6)


@pytest.mark.parametrize(
    ("logits", "labels", "relationship", "match"),
    [
        (torch.zeros(2, 6), torch.tensor([0, 1]), _R[0], r"Expected source logits \(B, K\)"),
        (torch.zeros(2, 5), torch.tensor([0, 1]), _R, r"must match the labels' batch \(2\)"),
        (torch.zeros(3, 6), torch.tensor([0, 1]), _R, "and the relationship's 6 source classes"),
        (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), _R, "needs a non-empty batch"),
        (torch.zeros(2, 6), torch.tensor([0, 3]), _R, r"Labels must be in \[0, 3\)"),
    ],
)
def test_cotuning_loss_errors(
    logits: torch.Tensor, labels: torch.Tensor, relationship: torch.Tensor, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        CT.cotuning_loss(logits, labels, relationship)
