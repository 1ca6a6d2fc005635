"""Batch Spectral Shrinkage: the function, its module and the objective's ``bss`` term."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deltaft.regularizers import BSSRegularizer
from deltaft.regularizers import functional as RF
from tests.reference import ref_bss_authors, ref_bss_penalty


def _features(batch: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen, dtype=dtype)


# --- the function ---


@pytest.mark.parametrize(("batch", "dim", "k"), [(6, 10, 1), (6, 10, 3), (9, 4, 2), (5, 5, 5)])
def test_bss_penalty_matches_references(batch: int, dim: int, k: int) -> None:
    f = _features(batch, dim, dtype=torch.float64)
    value = RF.bss_penalty(f, k)
    assert value.dtype == torch.float64 and value.dim() == 0
    assert_close(value, ref_bss_penalty(f, k))
    assert_close(value, ref_bss_authors(f, k))


def test_bss_penalty_float32_matches_float64_reference() -> None:
    f = _features(8, 12)
    value = RF.bss_penalty(f, 2)
    assert value.dtype == torch.float32
    assert_close(value.double(), ref_bss_penalty(f, 2), rtol=1e-5, atol=1e-6)


def test_bss_penalty_is_the_smallest_squared_singular_values() -> None:
    # rows scaled so the singular values are known: sigma = (5, 3, 0.25)
    q, _ = torch.linalg.qr(_features(7, 3, dtype=torch.float64))  # (7, 3), orthonormal columns
    f = (q * torch.tensor([5.0, 3.0, 0.25], dtype=torch.float64)).t()  # (3, 7)
    assert_close(RF.bss_penalty(f), torch.tensor(0.0625, dtype=torch.float64))
    assert_close(RF.bss_penalty(f, k=2), torch.tensor(9.0625, dtype=torch.float64))
    assert_close(RF.bss_penalty(f, k=3), torch.tensor(34.0625, dtype=torch.float64))


def test_bss_penalty_gradcheck() -> None:
    for shape, k in (((5, 7), 1), ((5, 7), 2), ((8, 3), 2)):
        f = _features(*shape, seed=3, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda t, k=k: RF.bss_penalty(t, k), (f,))


def test_bss_penalty_gradient_formula() -> None:
    """d sigma_n^2 / dF = 2 sigma_n u_n v_n^T for the smallest singular triple."""
    f = _features(4, 6, seed=2, dtype=torch.float64).requires_grad_()
    RF.bss_penalty(f).backward()
    u, s, vh = torch.linalg.svd(f.detach(), full_matrices=False)
    assert f.grad is not None
    assert_close(f.grad, 2 * s[-1] * torch.outer(u[:, -1], vh[-1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_the_float32_value(dtype: torch.dtype) -> None:
    f = _features(6, 10, seed=4).to(dtype).requires_grad_()
    value = RF.bss_penalty(f, 2)
    assert value.dtype == torch.float32
    # bit for bit the float32 computation (with a graph: svdvals then forms the singular vectors)
    assert torch.equal(value, RF.bss_penalty(f.detach().float().requires_grad_(), 2))
    assert_close(value, RF.bss_penalty(f.detach().float(), 2))
    value.backward()
    assert f.grad is not None and f.grad.dtype == dtype and f.grad.abs().sum() > 0


def test_bss_penalty_errors() -> None:
    with pytest.raises(ValueError, match=r"feature matrix, got shape \(2, 3, 4\)"):
        RF.bss_penalty(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expects a \(B, D\) feature matrix, got shape \(5,\)"):
        RF.bss_penalty(torch.randn(5))
    with pytest.raises(ValueError, match=r"k=3 needs at least 3 samples .* got a \(2, 8\)"):
        RF.bss_penalty(torch.randn(2, 8), k=3)
    with pytest.raises(ValueError, match=r"k=2 needs .* got a \(8, 1\) feature matrix"):
        RF.bss_penalty(torch.randn(8, 1), k=2)
    for k in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            RF.bss_penalty(torch.randn(4, 4), k=k)  # type: ignore[arg-type]


# --- the module ---


def test_bss_regularizer_delegates() -> None:
    f = _features(6, 10, seed=5)
    module = BSSRegularizer(k=2)
    assert module.k == 2 and "k=2" in repr(module)
    assert torch.equal(module(f), RF.bss_penalty(f, 2))
    assert BSSRegularizer().k == 1
    assert not list(module.parameters()) and not list(module.buffers())


def test_bss_regularizer_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        BSSRegularizer(k=0)
