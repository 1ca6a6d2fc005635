from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deltaft.regularizers import functional as RF
from tests.reference import (
    ref_delta_penalty,
    ref_feature_map_penalty,
    ref_l2_penalty,
    ref_l2sp_penalty,
)


def _maps(seed: int, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 4, 5, 6), "b.c": (3, 2, 3, 3)}
    return {
        n: torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
        for n, s in shapes.items()
    }


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a": torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0),
        "b.c": torch.softmax(torch.randn(2, generator=gen, dtype=torch.float64), 0),
    }


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_delta_penalty_matches_reference(reduction: str, with_weights: bool) -> None:
    s, t = _maps(0), _maps(1)
    w = _weights(2) if with_weights else None
    got = RF.delta_penalty(s, t, w, reduction=reduction)  # type: ignore[arg-type]
    assert_close(got, ref_delta_penalty(s, t, w, reduction))


def test_uniform_weights_equal_none() -> None:
    s, t = _maps(0), _maps(1)
    uniform = {n: torch.full((m.shape[1],), 1 / m.shape[1], dtype=m.dtype) for n, m in s.items()}
    assert_close(RF.delta_penalty(s, t, uniform), RF.delta_penalty(s, t, None))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_map_penalty_matches_reference(reduction: str) -> None:
    s, t = _maps(0), _maps(1)
    got = RF.feature_map_penalty(s, t, reduction=reduction)  # type: ignore[arg-type]
    assert_close(got, ref_feature_map_penalty(s, t, reduction))


def test_fm_is_hw_times_uniform_delta_per_layer() -> None:
    s, t = _maps(0), _maps(1)
    for name in s:
        one_s, one_t = {name: s[name]}, {name: t[name]}
        hw = s[name].shape[2] * s[name].shape[3]
        assert_close(RF.feature_map_penalty(one_s, one_t), hw * RF.delta_penalty(one_s, one_t))


@pytest.mark.parametrize("fn", [RF.delta_penalty, RF.feature_map_penalty])
def test_zero_when_target_equals_source(fn) -> None:  # type: ignore[no-untyped-def]
    s = _maps(0)
    assert fn(s, {n: m.clone() for n, m in s.items()}).item() == 0.0


@pytest.mark.parametrize("fn", [RF.delta_penalty, RF.feature_map_penalty])
def test_mean_is_sum_over_batch(fn) -> None:  # type: ignore[no-untyped-def]
    s, t = _maps(0), _maps(1)
    assert_close(fn(s, t, reduction="mean") * 3, fn(s, t, reduction="sum"))


def test_gradients_reach_target_only() -> None:
    s, t = _maps(0, requires_grad=True), _maps(1, requires_grad=True)
    (RF.delta_penalty(s, t, _weights(2)) + RF.feature_map_penalty(s, t)).backward()
    for name in s:
        assert s[name].grad is None
        assert t[name].grad is not None and t[name].grad.abs().sum() > 0


def test_delta_gradient_matches_closed_form() -> None:
    s, t, w = _maps(0), _maps(1, requires_grad=True), _weights(2)
    RF.delta_penalty(s, t, w).backward()
    for name, tm in t.items():
        _, c, h, wd = tm.shape
        expected = c * w[name].view(1, c, 1, 1) * (tm.detach() - s[name]) / (h * wd)
        assert_close(tm.grad, expected)


def test_l2sp_and_l2_match_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    params = {n: torch.randn(4, 3, generator=gen, dtype=torch.float64) for n in ("w", "b", "head")}
    reference = {n: torch.randn(4, 3, generator=gen, dtype=torch.float64) for n in ("w", "b")}
    assert_close(RF.l2sp_penalty(params, reference), ref_l2sp_penalty(params, reference))
    assert_close(RF.l2_penalty(params), ref_l2_penalty(list(params.values())))
    assert_close(RF.l2_penalty(list(params.values())), RF.l2_penalty(params))
    assert RF.l2sp_penalty(params, {n: params[n].clone() for n in reference}).item() == 0.0
    assert RF.l2_penalty([]).item() == 0.0


def test_l2sp_gradient_only_on_params() -> None:
    p = {"w": torch.randn(3, requires_grad=True)}
    r = {"w": torch.randn(3, requires_grad=True)}
    RF.l2sp_penalty(p, r).backward()
    assert r["w"].grad is None
    assert_close(p["w"].grad, p["w"].detach() - r["w"].detach())


def test_errors() -> None:
    s, t = _maps(0), _maps(1)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        RF.delta_penalty(s, t, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same layers"):
        RF.delta_penalty({"a": s["a"]}, t)
    with pytest.raises(ValueError, match=r"same shape"):
        RF.feature_map_penalty({"a": s["a"][:, :2], "b.c": s["b.c"]}, t)
    with pytest.raises(ValueError, match="No attention weights for layer 'b.c'"):
        RF.delta_penalty(s, t, {"a": _weights(0)["a"]})
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        RF.delta_penalty(s, t, {"a": torch.ones(3) / 3, "b.c": torch.ones(2) / 2})
    with pytest.raises(ValueError, match="at least one layer"):
        RF.delta_penalty({}, {})
    with pytest.raises(ValueError, match="at least one layer"):
        RF.feature_map_penalty({}, {})
    with pytest.raises(ValueError, match="in the reference but not in the model"):
        RF.l2sp_penalty({}, {"w": torch.ones(1)})
