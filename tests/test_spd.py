"""AdamSPD / SGDSPD against a plain loop of the published update, resume, head exclusion, errors."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from deltaft.optim import SGDSPD, AdamSPD
from tests.reference import ref_adam_spd, ref_sgd_spd


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(3, 4), (5,), (2,)]]


def _grads(seed: int, steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2,)]
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]


def _run(
    optimizer_cls: type,
    start: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    groups: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> list[torch.Tensor]:
    params = [nn.Parameter(p.clone()) for p in start]
    optimizer = optimizer_cls(groups(params) if groups else params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def _drifted() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Anchors, and start values a little away from them (as after some fine-tuning)."""
    anchors = _params(0)
    return anchors, [a + 0.1 * d for a, d in zip(anchors, _params(1), strict=True)]


@pytest.mark.parametrize("steps", [1, 30])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_spd_matches_published_update(steps: int, amsgrad: bool) -> None:
    anchors, start = _drifted()
    grads = _grads(2, steps)
    kwargs: dict[str, Any] = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.7}

    def groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": params, "anchor": anchors}]

    got = _run(AdamSPD, start, grads, groups, amsgrad=amsgrad, **kwargs)
    want, projected = ref_adam_spd(start, grads, list(anchors), amsgrad=amsgrad, **kwargs)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    if steps > 1:
        assert projected > 0  # the projection branch really ran


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_spd_matches_sgd_then_projection(momentum: float, nesterov: bool) -> None:
    anchors, start = _drifted()
    grads = _grads(3, 20)
    dampening = 0.0 if nesterov else 0.1 * (momentum > 0)
    kwargs: dict[str, Any] = {
        "lr": 0.05,
        "momentum": momentum,
        "dampening": dampening,
        "nesterov": nesterov,
        "weight_decay": 0.5,
    }

    def groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": params, "anchor": anchors}]

    got = _run(SGDSPD, start, grads, groups, **kwargs)
    want, projected = ref_sgd_spd(start, grads, list(anchors), **kwargs)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    assert projected > 0


def test_default_anchor_is_the_value_at_construction() -> None:
    start, grads = _params(0), _grads(1, 10)
    got = _run(AdamSPD, start, grads, lr=0.1, weight_decay=1.0)
    want, projected = ref_adam_spd(start, grads, list(start), 0.1, (0.9, 0.999), 1e-8, 1.0)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    assert projected > 0


def test_head_without_anchor_is_plain_adam() -> None:
    anchors, start = _drifted()
    grads = _grads(2, 20)

    def groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return [
            {"params": params[:2], "anchor": anchors[:2]},
            {"params": params[2:], "anchor": False},  # the new head
        ]

    got = _run(AdamSPD, start, grads, groups, lr=0.05, weight_decay=1.0)
    want, _ = ref_adam_spd(start, grads, [*anchors[:2], None], 0.05, (0.9, 0.999), 1e-8, 1.0)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    # The head equals plain Adam with any weight_decay; the anchored tensors do not.
    plain = _run(AdamSPD, start, grads, groups, lr=0.05, weight_decay=0.0)
    assert torch.equal(got[2], plain[2])
    assert not torch.equal(got[0], plain[0])


def test_head_group_has_no_anchor_in_state() -> None:
    backbone, head = nn.Linear(3, 3), nn.Linear(3, 2)
    optimizer = SGDSPD(
        [{"params": backbone.parameters()}, {"params": head.parameters(), "anchor": False}]
    )
    assert all("anchor" in optimizer.state[p] for p in backbone.parameters())
    assert all("anchor" not in optimizer.state[p] for p in head.parameters())
    assert [g["anchor"] for g in optimizer.param_groups] == [True, False]


def test_weight_decay_zero_is_torch_sgd_and_adam() -> None:
    start, grads = [p.float() for p in _params(0)], _grads(1, 15)
    grads = [[g.float() for g in step] for step in grads]
    sgd = dict(lr=0.1, momentum=0.9, nesterov=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            _run(SGDSPD, start, grads, **sgd),
            _run(torch.optim.SGD, start, grads, **sgd),
            strict=True,
        )
    )
    for a, b in zip(
        _run(AdamSPD, start, grads, lr=0.01),
        _run(torch.optim.Adam, start, grads, lr=0.01),
        strict=True,
    ):
        assert_close(a, b)


def test_parameter_without_grad_is_skipped() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = AdamSPD([a, b], lr=0.1, weight_decay=1.0)
    a.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert optimizer.state[a]["step"] == 1 and "step" not in optimizer.state[b]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "anchor": False},
    ]


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs"),
    [
        (AdamSPD, {"lr": 0.05, "weight_decay": 0.8, "amsgrad": True}),
        (SGDSPD, {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.8}),
    ],
)
def test_state_dict_resume_is_bit_identical(optimizer_cls: type, kwargs: dict[str, Any]) -> None:
    reference = _model()
    optimizer = optimizer_cls(_groups(reference), **kwargs)
    _train(reference, optimizer, range(20))

    interrupted = _model()
    first = optimizer_cls(_groups(interrupted), **kwargs)
    _train(interrupted, first, range(10))
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optimizer": first.state_dict()}, buffer)
    del interrupted, first  # "kill"
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    # Built on the fine-tuned weights: its own anchors are wrong until the state is loaded.
    second = optimizer_cls(_groups(resumed), **kwargs)
    second.load_state_dict(saved["optimizer"])
    _train(resumed, second, range(10, 20))

    pretrained = _model()
    anchors = [second.state[p]["anchor"] for p in resumed[0].parameters()]
    assert all(torch.equal(a, p) for a, p in zip(anchors, pretrained[0].parameters(), strict=True))
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_without_loading_state_differs() -> None:
    """The anchors matter: a fresh optimizer on resumed weights does not continue the run."""
    kwargs = {"lr": 0.05, "weight_decay": 1.0}
    reference = _model()
    _train(reference, AdamSPD(_groups(reference), **kwargs), range(20))
    resumed = _model()
    first = AdamSPD(_groups(resumed), **kwargs)
    _train(resumed, first, range(10))
    second = AdamSPD(_groups(resumed), **kwargs)
    second.load_state_dict({**first.state_dict(), "state": {}})
    _train(resumed, second, range(10, 20))
    assert not torch.equal(reference[0].weight, resumed[0].weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
    ],
)
def test_adam_spd_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdamSPD([nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": float("nan")}, "lr must be >= 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"momentum": -0.5}, "momentum must be >= 0"),
        ({"dampening": -0.5}, "dampening must be >= 0"),
        ({"nesterov": True}, "nesterov needs momentum > 0 and dampening = 0"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov needs momentum"),
    ],
)
def test_sgd_spd_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SGDSPD([nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize(
    ("anchor", "match"),
    [
        ("pretrained", "'anchor' must be True .* or a list of tensors"),
        ([torch.zeros(2)], "Got 1 anchors for a group of 2 parameters"),
        ([torch.zeros(2), torch.zeros(3)], r"Anchor 1 has shape \(3,\), its parameter \(2, 2\)"),
    ],
)
def test_anchor_errors(anchor: object, match: str) -> None:
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match=match):
        AdamSPD([{"params": params, "anchor": anchor}])
    optimizer = AdamSPD([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=match):
        optimizer.add_param_group({"params": params, "anchor": anchor})
    assert len(optimizer.param_groups) == 1  # the rejected group was not added


@pytest.mark.parametrize("optimizer_cls", [AdamSPD, SGDSPD])
def test_sparse_gradients_are_rejected(optimizer_cls: type) -> None:
    p = nn.Parameter(torch.zeros(3))
    optimizer = optimizer_cls([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(ValueError, match=f"{optimizer_cls.__name__} does not support sparse"):
        optimizer.step()


def test_explicit_anchors_are_copied() -> None:
    p = nn.Parameter(torch.ones(2))
    anchor = torch.zeros(2)
    optimizer = SGDSPD([{"params": [p], "anchor": [anchor]}])
    anchor.add_(5.0)
    assert torch.equal(optimizer.state[p]["anchor"], torch.zeros(2))
    assert copy.deepcopy(optimizer).state_dict()["param_groups"][0]["anchor"] is True
