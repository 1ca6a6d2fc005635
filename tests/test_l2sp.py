"""The fused L2-SP penalty against the naive loops of tests/reference.py.

Float32 tolerances, with u = 2**-24 the unit roundoff: a gradient ``g * (p - r)`` is two
roundings away from the exact value (``GRAD_RTOL = 4u``). A value is a sum of squares of rounded
differences reduced in blocks (a cascade sum on CPU, ``_foreach_norm`` squared on CUDA): its
worst-case error is about u times (block length + log2 n), ~100u, hence ``VALUE_RTOL = 1e-5``;
measured errors are below 2e-7 (ResNet-18 on CPU 8e-8, ResNet-50 per tensor on an H100 1.5e-7).
Float64 is compared at 1e-10, above the round-off of the reference's own 11 M-term Python sum
(1.6e-12 measured); it would catch a dropped tensor, which float32's tolerance might not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from deltaft import TransferObjective
from deltaft.regularizers import L2SPRegularizer
from deltaft.regularizers import functional as RF
from tests.conftest import TinyNet
from tests.reference import ref_l2sp_grads, ref_l2sp_penalty

VALUE_RTOL = 1e-5
GRAD_RTOL = 4 * 2.0**-24
F64_RTOL = 1e-10
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _drift(model: nn.Module, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``model``'s parameters moved by ~1e-2 from a copy of their values (the reference)."""
    gen = torch.Generator().manual_seed(seed)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(noise.to(p.device), alpha=1e-2)
    return dict(model.named_parameters()), reference


def _grads(value: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    value.backward()
    return {n: p.grad for n, p in params.items() if p.grad is not None}


def _assert_matches(
    value: Tensor,
    grads: dict[str, Tensor],
    ref_value: Tensor,
    ref_grads: dict[str, Tensor],
    rtol: float,
    grad_rtol: float,
) -> None:
    assert_close(value.double().cpu(), ref_value, rtol=rtol, atol=0.0)
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in grads.items():
        assert_close(grad.double().cpu(), ref_grads[name], rtol=grad_rtol, atol=0.0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_toy_model_matches_reference_loop(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    params, reference = _drift(TinyNet().to(dtype))
    value = RF.l2sp_penalty(params, reference)
    assert value.dtype == dtype
    rtol, grad_rtol = (F64_RTOL, F64_RTOL) if dtype == torch.float64 else (VALUE_RTOL, GRAD_RTOL)
    _assert_matches(
        value,
        _grads(value, params),
        ref_l2sp_penalty(params, reference),
        ref_l2sp_grads(params, reference),
        rtol,
        grad_rtol,
    )


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Random-weight ResNet-18, drifted, and its reference value (the 11 M-element loop, ~2 s)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    params, reference = _drift(model)
    return model, params, reference, ref_l2sp_penalty(params, reference)


def _check_resnet18(
    resnet18: tuple[nn.Module, dict[str, Tensor], dict[str, Tensor], Tensor],
    dtype: torch.dtype,
    device: str,
) -> None:
    model, _, reference, ref_value = resnet18
    model = copy.deepcopy(model).to(device=device, dtype=dtype)  # float64 copies are exact
    params = dict(model.named_parameters())
    refs = {n: r.to(device=device, dtype=dtype) for n, r in reference.items()}
    value = RF.l2sp_penalty(params, refs)
    assert value.dtype == dtype and value.device.type == device
    # The loop over 11 M elements is the value's reference; the gradient's elementwise formula
    # is evaluated vectorized in float64, which is what ref_l2sp_grads computes (slowly).
    ref_grads = {n: p.detach().cpu().double() - reference[n].double() for n, p in params.items()}
    rtol, grad_rtol = (F64_RTOL, F64_RTOL) if dtype == torch.float64 else (VALUE_RTOL, GRAD_RTOL)
    _assert_matches(value, _grads(value, params), ref_value, ref_grads, rtol, grad_rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resnet18_matches_reference_loop(resnet18, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    _check_resnet18(resnet18, dtype, "cpu")


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resnet18_matches_reference_loop_on_cuda(resnet18, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    _check_resnet18(resnet18, dtype, "cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_gradcheck_and_double_backward(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (3, 2, 2), "b": (4,), "s": ()}
    ref = {
        n: torch.randn(s, generator=gen, dtype=torch.float64).to(device) for n, s in shapes.items()
    }
    inputs = tuple(
        torch.randn(s, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        for s in shapes.values()
    )
    frozen = torch.randn(5, generator=gen, dtype=torch.float64).to(device)
    ref["frozen"] = torch.randn(5, generator=gen, dtype=torch.float64).to(device)

    def penalty(*tensors: Tensor) -> Tensor:
        return RF.l2sp_penalty({**dict(zip(shapes, tensors, strict=True)), "frozen": frozen}, ref)

    assert gradcheck(penalty, inputs)
    assert gradgradcheck(penalty, inputs)


def test_frozen_parameters_and_reference_subset() -> None:
    gen = torch.Generator().manual_seed(2)
    params = {n: torch.randn(4, 3, generator=gen, dtype=torch.float64) for n in "abc"}
    params["a"].requires_grad_()
    params["head"] = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    reference = {n: torch.randn(4, 3, generator=gen, dtype=torch.float64) for n in "abc"}
    value = RF.l2sp_penalty(params, reference)
    assert_close(value, ref_l2sp_penalty(params, reference), rtol=F64_RTOL, atol=0.0)
    value.backward()
    assert_close(params["a"].grad, ref_l2sp_grads(params, reference)["a"], rtol=F64_RTOL, atol=0.0)
    assert params["b"].grad is None and params["head"].grad is None  # frozen; not in reference
    frozen = {n: params[n] for n in "bc"}
    value = RF.l2sp_penalty(frozen, {n: reference[n] for n in "bc"})
    assert not value.requires_grad
    assert_close(value, ref_l2sp_penalty(frozen, {n: reference[n] for n in "bc"}))


def test_reference_gets_no_gradient_and_empty_is_zero() -> None:
    p = {"w": torch.randn(3, requires_grad=True)}
    r = {"w": torch.randn(3, requires_grad=True)}
    RF.l2sp_penalty(p, r).backward()
    assert r["w"].grad is None
    empty = RF.l2sp_penalty(p, {})
    assert empty.shape == () and empty.item() == 0.0 and not empty.requires_grad


def test_missing_name_lists_it() -> None:
    params = {"a": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"Parameters \['b'\] are in the reference but not in"):
        RF.l2sp_penalty(params, {"a": torch.zeros(2), "b": torch.zeros(2)})


def test_repeated_backward_and_mixed_dtypes() -> None:
    # retain_graph: the first backward hands its buffers over as gradients, the second recomputes
    gen = torch.Generator().manual_seed(3)
    params = {
        "x": torch.randn(5, generator=gen, requires_grad=True),
        "y": torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True),
    }
    reference = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    value = RF.l2sp_penalty(params, reference)
    assert value.dtype == torch.float64  # promoted as by stacking the per-tensor terms
    (3 * value).backward(retain_graph=True)
    value.backward(retain_graph=True)
    expected = ref_l2sp_grads(params, reference, scale=4.0)
    for name, p in params.items():
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert_close(p.grad.double(), expected[name], rtol=GRAD_RTOL, atol=0.0)
    # a third backward after an in-place update would recompute from changed values: it raises
    with torch.no_grad():
        params["x"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_second_step_after_optimizer_update(set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = TinyNet().double()
    params, reference = _drift(model)
    regularizer = L2SPRegularizer(reference)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    values = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=set_to_none)
        value = 0.7 * regularizer(params)
        assert_close(value, 0.7 * ref_l2sp_penalty(params, reference), rtol=F64_RTOL, atol=0.0)
        value.backward()
        expected = ref_l2sp_grads(params, reference, scale=0.7)
        for name, p in params.items():
            assert_close(p.grad, expected[name], rtol=F64_RTOL, atol=0.0, msg=name)
        optimizer.step()
        values.append(value.item())
    assert values[0] > values[1] > values[2]  # the updates pulled the parameters back


def test_objective_parts_equal_the_naive_formula(batch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    source = TinyNet(num_classes=5).eval()
    model = copy.deepcopy(source)
    model.fc = nn.Linear(16, 4)
    _drift(model)
    objective = TransferObjective(model, source, "l2sp", alpha=0.3, beta=0.2).train()
    out = objective(*batch)
    backbone = {n: p for n, p in model.named_parameters() if not n.startswith("fc.")}
    start = {n: p.detach() for n, p in source.named_parameters() if n in backbone}
    assert_close(
        out["reg/l2sp"].double(), 0.3 * ref_l2sp_penalty(backbone, start), rtol=VALUE_RTOL, atol=0.0
    )
    # the previous implementation: one sub/pow/sum graph per parameter, then stack
    naive = 0.5 * torch.stack([(backbone[n] - start[n]).pow(2).sum() for n in start]).sum()
    head = 0.5 * (model.fc.weight.pow(2).sum() + model.fc.bias.pow(2).sum())
    assert_close(out["reg/head"], 0.2 * head)
    assert_close(out["loss"], out["task_loss"] + out["reg/l2sp"] + out["reg/head"])
    naive_loss = out["task_loss"] + 0.3 * naive + 0.2 * head
    assert_close(out["loss"], naive_loss)
    names = [n for n, _ in model.named_parameters()]
    got = torch.autograd.grad(out["loss"], list(model.parameters()), retain_graph=True)
    want = torch.autograd.grad(naive_loss, list(model.parameters()))
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, rtol=1e-5, atol=1e-7, msg=name)
