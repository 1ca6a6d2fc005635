"""WiSE-FT weight interpolation and BatchNorm re-estimation."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from deltaft import interpolate_weights, recompute_batchnorm
from tests.conftest import TinyNet
from tests.reference import ref_interpolate_weights


def _state_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dicts of two differently trained TinyNets: BatchNorm counters differ too."""
    torch.manual_seed(0)
    pre, ft = TinyNet(), TinyNet()
    with torch.no_grad():
        pre.train()(torch.randn(4, 3, 8, 8))
        for _ in range(3):
            ft.train()(torch.randn(4, 3, 8, 8) + 1)
    return pre.state_dict(), ft.state_dict()


# --- interpolate_weights ---


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9])
def test_interpolate_matches_per_key_loop(alpha: float) -> None:
    pre, ft = _state_pair()
    theta = interpolate_weights(pre, ft, alpha)
    ref = ref_interpolate_weights(pre, ft, alpha)
    assert list(theta) == list(ft)
    for key, value in theta.items():
        assert value.dtype == ft[key].dtype, key
        if value.is_floating_point():
            assert_close(value.double(), ref[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, ref[key]), key


def test_integer_buffers_come_from_finetuned() -> None:
    pre, ft = _state_pair()
    counters = [k for k in ft if k.endswith("num_batches_tracked")]
    assert counters and all(not torch.equal(pre[k], ft[k]) for k in counters)
    for alpha in (0.0, 0.3, 1.0):
        theta = interpolate_weights(pre, ft, alpha)
        for key in counters:
            assert theta[key].dtype == torch.long and torch.equal(theta[key], ft[key])


@pytest.mark.parametrize(("alpha", "end"), [(0.0, 0), (1.0, 1)])
def test_ends_are_copies_of_the_inputs(alpha: float, end: int) -> None:
    pre, ft = _state_pair()
    pre["fc.bias"][0] = float("inf")  # 0 * inf would give nan without the exact copy
    expected = (pre, ft)[end]
    theta = interpolate_weights(pre, ft, alpha)
    for key, value in theta.items():
        source = ft[key] if not value.is_floating_point() else expected[key]
        assert torch.equal(value, source), key
        assert value.data_ptr() != source.data_ptr(), key
    before = {k: v.clone() for k, v in ft.items()}
    for value in theta.values():
        value.zero_()
    assert all(torch.equal(ft[k], before[k]) for k in ft)


def test_interpolated_state_loads_and_has_no_graph() -> None:
    torch.manual_seed(0)
    pre_model, ft_model = TinyNet(), TinyNet()
    theta = interpolate_weights(
        dict(pre_model.named_parameters()), dict(ft_model.named_parameters()), 0.5
    )
    assert all(not t.requires_grad for t in theta.values())
    model = TinyNet()
    model.load_state_dict(interpolate_weights(pre_model.state_dict(), ft_model.state_dict(), 0.5))
    assert_close(model.fc.weight, (pre_model.fc.weight + ft_model.fc.weight) / 2)


def test_pretrained_is_cast_to_finetuned_dtype() -> None:
    theta = interpolate_weights(
        {"w": torch.zeros(3, dtype=torch.float64)}, {"w": torch.ones(3)}, 0.5
    )
    assert theta["w"].dtype == torch.float32
    assert torch.equal(theta["w"], torch.full((3,), 0.5))


def test_interpolate_errors() -> None:
    pre, ft = _state_pair()
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            interpolate_weights(pre, ft, alpha)
    extra = {**ft, "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"only in pretrained: \[\]; only in finetuned: \['extra"):
        interpolate_weights(pre, extra, 0.5)
    missing = {k: v for k, v in ft.items() if not k.startswith("stem.")}
    with pytest.raises(ValueError, match=r"only in pretrained: \['stem.0.weight', .* and 1 more\]"):
        interpolate_weights(pre, missing, 0.5)
    wrong = {**ft, "fc.weight": torch.zeros(3, 16)}
    with pytest.raises(ValueError, match=r"shapes differ .*'fc.weight': \(4, 16\) vs \(3, 16\)\."):
        interpolate_weights(pre, wrong, 0.5)


# --- recompute_batchnorm ---


class _ConvBN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(4, 5, 1),
            nn.BatchNorm2d(5, momentum=0.3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 2),
        )


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 6, 6, generator=gen) * 2 + 1, torch.zeros(4)) for _ in range(n)]


def _hand_statistics(model: _ConvBN, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """(mean, unbiased var) per BatchNorm, averaged over batches; each BN normalizes by batch."""
    conv1, bn1, _, _, conv2 = list(model)[:5]
    sums = [[torch.zeros(4), torch.zeros(4)], [torch.zeros(5), torch.zeros(5)]]
    with torch.no_grad():
        for x, _ in batches:
            h1 = conv1(x)  # (B, 4, 4, 4)
            m1, v1 = h1.mean(dim=(0, 2, 3)), h1.var(dim=(0, 2, 3), unbiased=True)
            biased = h1.var(dim=(0, 2, 3), unbiased=False)
            z = (h1 - m1[:, None, None]) / torch.sqrt(biased[:, None, None] + bn1.eps)
            h2 = conv2(torch.relu(z * bn1.weight[:, None, None] + bn1.bias[:, None, None]))
            m2, v2 = h2.mean(dim=(0, 2, 3)), h2.var(dim=(0, 2, 3), unbiased=True)
            for acc, (m, v) in zip(sums, ((m1, v1), (m2, v2)), strict=True):
                acc[0] += m
                acc[1] += v
    return [(m / len(batches), v / len(batches)) for m, v in sums]


def test_recompute_batchnorm_matches_hand_statistics() -> None:
    torch.manual_seed(0)
    model = _ConvBN()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
        model.train()(torch.randn(4, 3, 6, 6))  # stale statistics to be replaced
    model.eval()
    model[3].train()  # a module in train mode keeps it; dropout must not act meanwhile
    batches = _batches(5)
    used = recompute_batchnorm(model, batches, n_batches=3)
    assert used == 3
    expected = _hand_statistics(model, batches[:3])
    for bn, (mean, var) in zip((model[1], model[5]), expected, strict=True):
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
        assert int(bn.num_batches_tracked) == 3
    assert [m.training for m in model] == [False, False, False, True] + [False] * 5
    assert not model.training
    assert model[1].momentum == 0.1 and model[5].momentum == 0.3
    assert all(p.grad is None for p in model.parameters())


def test_recompute_batchnorm_uses_what_there_is_and_no_more() -> None:
    model = _ConvBN().train()
    pulled: list[int] = []

    def stream() -> Iterator[torch.Tensor]:
        for i, (x, _) in enumerate(_batches(6)):
            pulled.append(i)
            yield x  # bare tensors work too

    assert recompute_batchnorm(model, stream(), n_batches=2) == 2
    assert pulled == [0, 1]  # a loader is not asked for a third batch
    assert model.training and all(m.training for m in model)
    assert recompute_batchnorm(model, _batches(2), n_batches=10) == 2
    assert int(model[1].num_batches_tracked) == 2


def test_recompute_batchnorm_without_batchnorm_runs_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))

    def never() -> Iterator[torch.Tensor]:
        raise AssertionError("no batch should be read")
        yield torch.zeros(1)

    assert recompute_batchnorm(model, never(), n_batches=4) == 0


def test_recompute_batchnorm_errors() -> None:
    model = _ConvBN()
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_batches must be a positive integer"):
            recompute_batchnorm(model, _batches(1), n_batches=n)  # type: ignore[arg-type]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="batches yielded no batch"):
        recompute_batchnorm(model, [], n_batches=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
