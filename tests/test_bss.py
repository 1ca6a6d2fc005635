"""Batch Spectral Shrinkage: the function, its module and the objective's ``bss`` term."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from deltaft import TransferObjective
from deltaft.regularizers import BSSRegularizer
from deltaft.regularizers import functional as RF
from tests.conftest import TinyNet
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


# --- the objective's bss term ---

LAYERS = ["conv1", "conv2"]


def _pair() -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    source = TinyNet(num_classes=5).eval()
    model = copy.deepcopy(source)
    model.fc = nn.Linear(16, 4)
    return model, source


def _objective(method: str, **kwargs) -> TransferObjective:  # type: ignore[no-untyped-def]
    model, source = _pair()
    if method in ("fm", "delta"):
        kwargs.setdefault("layers", LAYERS)
    if method == "delta":
        kwargs.setdefault("attention", "uniform")
    return TransferObjective(model, source, method, **kwargs)  # type: ignore[arg-type]


def _pooled_features(model: TinyNet, x: torch.Tensor) -> torch.Tensor:
    """TinyNet's forward written out up to the classifier's input, shape ``(B, 16)``."""
    h = model.stem(x)
    h = torch.relu(model.bn1(model.conv1(h)) + h)
    h = torch.relu(model.bn2(model.conv2(h)))
    return model.pool(h).flatten(1)


@pytest.mark.parametrize("method", ["l2", "l2sp", "fm", "delta"])
def test_bss_term_value_and_other_parts(method: str, batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    plain = _objective(method).train()
    with_bss = _objective(method, bss=0.05, bss_k=2).train()
    out, ref = with_bss(x, y), plain(x, y)
    assert list(out) == [*list(ref)[:-1], "reg/bss", "loss"]
    assert list(with_bss.terms)[-1] == "reg/bss"
    features = _pooled_features(with_bss.model, x)  # type: ignore[arg-type]
    assert_close(out["reg/bss"], 0.05 * RF.bss_penalty(features, 2))
    for part in ref:
        if part != "loss":
            assert torch.equal(out[part], ref[part]), part
    parts = [out[p] for p in out if p not in ("logits", "loss")]
    assert_close(out["loss"], torch.stack(parts).sum())


@pytest.mark.parametrize("method", ["l2", "delta"])
def test_bss_zero_changes_nothing(method: str, batch) -> None:  # type: ignore[no-untyped-def]
    default, off = _objective(method).train(), _objective(method, bss=0.0, bss_k=3).train()
    a, b = default(*batch), off(*batch)
    assert list(a) == list(b) and "reg/bss" not in a and list(off.terms) == list(default.terms)
    for part in a:
        assert torch.equal(a[part], b[part]), part


def test_bss_gradients_reach_the_backbone_not_the_head(batch) -> None:  # type: ignore[no-untyped-def]
    objective = _objective("l2", bss=0.001).train()
    objective(*batch)["reg/bss"].backward()
    model = objective.model
    for name, param in model.named_parameters():
        if name.startswith("fc."):
            assert param.grad is None, name  # the head's input does not depend on the head
        elif "conv" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bss_hook_is_removed(batch) -> None:  # type: ignore[no-untyped-def]
    objective = _objective("l2", bss=0.001)
    objective(*batch)
    assert not objective.model.fc._forward_pre_hooks


class _TwoHeads(nn.Module):
    """Calls ``fc`` twice and never calls ``unused``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.fc(h) + self.fc(h.flip(0))


@pytest.mark.parametrize(("head", "times"), [("fc", 2), ("unused", 0)])
def test_bss_needs_one_head_call(head: str, times: int, batch) -> None:  # type: ignore[no-untyped-def]
    model = _TwoHeads()
    objective = TransferObjective(model, copy.deepcopy(model), "l2", head=head, bss=0.001)
    with pytest.raises(
        ValueError, match=f"head '{head}' to run once per forward, but it ran {times}"
    ):
        objective(batch[0], batch[1] % 3)
    assert not getattr(model, head)._forward_pre_hooks


def test_bss_argument_errors() -> None:
    for bss in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="bss must be >= 0"):
            _objective("l2", bss=bss)
    for k in (0, 1.5, True):
        with pytest.raises(ValueError, match="bss_k must be a positive integer"):
            _objective("l2", bss=0.001, bss_k=k)


def test_bss_term_under_autocast(batch) -> None:  # type: ignore[no-untyped-def]
    """Under AMP the head's input is low precision; the SVD still runs, in float32."""
    objective = _objective("delta", bss=0.001).train()
    seen: list[torch.dtype] = []
    objective.model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(*batch)
    assert seen == [torch.bfloat16]
    assert out["reg/bss"].dtype == torch.float32 and torch.isfinite(out["reg/bss"])
    out["loss"].backward()
    assert objective.model.conv1.weight.grad is not None
