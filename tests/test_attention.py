"""Tests of deltaft.attention: removal scores against the naive loop, weights, value object."""

from __future__ import annotations

import copy
import logging
import os
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from deltaft.attention import (
    ChannelAttention,
    attention_from_scores,
    channel_removal_scores,
    data_fingerprint,
    estimate_channel_attention,
    model_fingerprint,
)
from deltaft.attention import estimate as estimate_module
from deltaft.attention import replay as replay_module
from deltaft.attention import scores as scores_module
from deltaft.attention import value as value_module
from deltaft.layers import output_shapes, resolve_layers
from tests.reference import ref_attention_from_scores, ref_removal_scores

Batches = list[tuple[Tensor, Tensor]]
NUM_CLASSES = 5


# ------------------------------------------------------------------------------------------------
# Toy models and data
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """conv-bn-hardswish(in place)-conv-bn, plus a skip connection from the block's input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        # In place and not idempotent: the cache must keep bn_a's output from before it runs.
        self.act = nn.Hardswish(inplace=True)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn_b(self.conv_b(self.act(self.bn_a(self.conv_a(x))))) + x)


class ResidualToy(nn.Module):
    """stem -> residual block (its skip crosses the masked layers) -> strided conv -> fc."""

    def __init__(self, width: int = 6, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.block = Block(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 10, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(10),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem(x))
        return self.fc(self.down(x).mean(dim=(2, 3)))


class SharedConvToy(nn.Module):
    """The same conv applied twice in a row: both of its outputs are masked."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.stem(x))
        x = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Untraceable(ResidualToy):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # unchanged by repeating the batch
            x = x * 2
        return super().forward(x)


class UpstreamBatchSize(ResidualToy):
    """Traceable, but reads the batch size upstream of the layers: the batched replay fails."""

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        logits = super().forward(x)
        return logits.view(batch, -1, NUM_CLASSES).mean(dim=1)  # (B, N), per sample


class TupleOutput(ResidualToy):
    """Returns (logits, extra) like Inception-V3 in train mode."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return logits, logits.detach() * 0


Output = namedtuple("Output", ["aux", "logits"])


class NamedOutput(ResidualToy):
    def forward(self, x: Tensor) -> Output:  # type: ignore[override]
        logits = super().forward(x)
        return Output(aux=logits * 0, logits=logits)


class DeadBranch(ResidualToy):
    """``side`` runs but does not reach the output: its scores are exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(3, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.side(x)
        return super().forward(x)


def settle(model: nn.Module, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics: a few train-mode forwards, then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model.to(dtype).train()
    with torch.no_grad():
        for _ in range(3):
            model(2 * torch.randn(8, 3, 16, 16, generator=gen, dtype=dtype) + 0.5)
    return model.eval()


def make_batches(
    n: int = 2,
    size: int = 16,
    batch: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 1,
    classes: int = NUM_CLASSES,
) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, size, size, generator=gen, dtype=dtype),
            torch.randint(0, classes, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


@pytest.fixture
def toy() -> ResidualToy:
    torch.manual_seed(0)
    return settle(ResidualToy())


def no_warnings(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.WARNING]


TOY_INNER = ["stem.0", "block.conv_a", "block.bn_a", "block.bn_b", "down.1"]


# ------------------------------------------------------------------------------------------------
# channel_removal_scores: exact == reference loop
# ------------------------------------------------------------------------------------------------
def test_exact_matches_reference_inside_residual_block(
    toy: ResidualToy, caplog: pytest.LogCaptureFixture
) -> None:
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(toy), batches, TOY_INNER)
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(toy, batches, TOY_INNER, chunk_size=4)
    assert no_warnings(caplog)  # the fx replay path, no fallback
    assert list(got) == TOY_INNER
    for name in TOY_INNER:
        assert got[name].dtype == torch.float64 and got[name].device.type == "cpu"
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
        assert got[name].abs().max() > 1e-4  # the comparison is not between zeros


def test_exact_matches_reference_at_block_outputs(
    toy: ResidualToy, caplog: pytest.LogCaptureFixture
) -> None:
    layers = ["stem", "block", "down"]
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(toy), batches, layers)
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(toy, batches, layers)
    assert no_warnings(caplog)
    for name in layers:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_exact_matches_reference_float32() -> None:
    torch.manual_seed(0)
    model = settle(ResidualToy(), torch.float32)
    batches = make_batches(dtype=torch.float32)
    expected = ref_removal_scores(copy.deepcopy(model).double(), _double(batches), TOY_INNER)
    got = channel_removal_scores(model, batches, TOY_INNER)
    for name in TOY_INNER:
        assert got[name].dtype == torch.float32
        # Float32 losses (about 2) differ at ~1e-6 relative; compare at 1e-5 of the loss scale.
        torch.testing.assert_close(got[name].double(), expected[name], rtol=0, atol=2e-5)


def _double(batches: Batches) -> Batches:
    return [(x.double(), y) for x, y in batches]


def test_exact_shared_module_masks_every_call() -> None:
    torch.manual_seed(0)
    model = SharedConvToy().double().eval()
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(model), batches, ["shared", "stem"])
    got = channel_removal_scores(model, batches, ["shared", "stem"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 6, 100])
def test_chunk_size_does_not_change_scores(toy: ResidualToy, chunk_size: int) -> None:
    batches = make_batches()
    reference = channel_removal_scores(toy, batches, TOY_INNER, method="reference")
    got = channel_removal_scores(toy, batches, TOY_INNER, chunk_size=chunk_size)
    for name in TOY_INNER:  # C = 6 or 10: 4 divides neither
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-10)


def test_untraceable_model_falls_back_to_batched_forwards(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = settle(Untraceable())
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(model), batches, TOY_INNER)
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(model, batches, TOY_INNER, chunk_size=4)
    assert "cannot trace Untraceable" in caplog.text
    for name in TOY_INNER:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-8)


def test_failed_replay_falls_back_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = settle(UpstreamBatchSize())
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(model), batches, ["block.conv_a"])
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(model, batches, ["block.conv_a"])
    assert "Replaying the layers downstream of 'block.conv_a'" in caplog.text
    assert "Running the fx trace" not in caplog.text  # the next batch's run skips the dropped layer
    torch.testing.assert_close(got["block.conv_a"], expected["block.conv_a"], rtol=0, atol=1e-8)


def test_failed_full_run_falls_back(
    toy: ResidualToy, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, x: Tensor) -> None:
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(replay_module.GraphReplay, "run", broken)
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(toy), batches, TOY_INNER)
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(toy, batches, TOY_INNER)
    assert (
        "Running the fx trace of ResidualToy failed (RuntimeError: unsupported op)" in caplog.text
    )
    for name in TOY_INNER:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-8)


def test_layer_inside_another_layer_falls_back(
    toy: ResidualToy, caplog: pytest.LogCaptureFixture
) -> None:
    layers = ["block", "block.conv_b"]  # fx keeps `block` whole: no node for block.conv_b
    batches = make_batches()
    expected = ref_removal_scores(copy.deepcopy(toy), batches, layers)
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(toy, batches, layers)
    assert "Layer 'block.conv_b' is inside another layer" in caplog.text
    for name in layers:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-8)


@pytest.mark.parametrize("cls", [TupleOutput, NamedOutput])
def test_tuple_and_named_outputs(cls: type[ResidualToy]) -> None:
    torch.manual_seed(0)
    model = settle(cls())
    plain = ResidualToy().double()
    plain.load_state_dict(model.state_dict())
    batches = make_batches()
    expected = channel_removal_scores(plain, batches, ["block.conv_a"], method="reference")
    for method in ("exact", "reference"):
        got = channel_removal_scores(model, batches, ["block.conv_a"], method=method)  # type: ignore[arg-type]
        torch.testing.assert_close(got["block.conv_a"], expected["block.conv_a"])


def test_layer_that_does_not_reach_the_output_scores_zero() -> None:
    torch.manual_seed(0)
    model = settle(DeadBranch())
    got = channel_removal_scores(model, make_batches(), ["side", "block.conv_a"])
    assert torch.equal(got["side"], torch.zeros(3, dtype=torch.float64))
    assert got["block.conv_a"].abs().max() > 0


def test_loss_fn_override(toy: ResidualToy) -> None:
    batches = make_batches()

    def doubled(logits: Tensor, y: Tensor) -> Tensor:
        return 2 * nn.functional.cross_entropy(logits, y)

    base = channel_removal_scores(toy, batches, ["block.conv_a"])
    for method in ("exact", "reference"):
        got = channel_removal_scores(
            toy,
            batches,
            ["block.conv_a"],
            loss_fn=doubled,
            method=method,  # type: ignore[arg-type]
        )
        torch.testing.assert_close(got["block.conv_a"], 2 * base["block.conv_a"])


def test_modes_restored_and_model_unchanged(toy: ResidualToy) -> None:
    toy.train()
    toy.block.eval()  # a mixed state must come back as it was
    state = copy.deepcopy(toy.state_dict())
    for method in ("exact", "reference", "taylor"):
        scores = channel_removal_scores(toy, make_batches(), ["block.conv_a"], method=method)  # type: ignore[arg-type]
        assert not scores["block.conv_a"].is_inference()  # usable in autograd later
    assert toy.training and not toy.block.training and toy.stem.training
    for name, value in toy.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert not [n for n in vars(toy) if n.startswith("_tensor_constant")]


def test_uses_first_n_batches_only(toy: ResidualToy) -> None:
    batches = make_batches(n=3)
    got = channel_removal_scores(toy, iter(batches), ["down.1"], n_batches=2)
    expected = channel_removal_scores(toy, batches[:2], ["down.1"], n_batches=5)
    torch.testing.assert_close(got["down.1"], expected["down.1"], rtol=0, atol=0)


def test_taylor_is_the_first_order_estimate(toy: ResidualToy) -> None:
    batches = make_batches()
    got = channel_removal_scores(toy, batches, ["block.conv_a", "down.1"], method="taylor")
    modules = dict(toy.named_modules())
    for name in ("block.conv_a", "down.1"):
        expected = torch.zeros_like(got[name])
        for x, y in batches:  # -sum_{b,h,w} a * dL/da, by autograd on a retained activation
            kept: list[Tensor] = []

            def keep(
                module: nn.Module, args: object, out: Tensor, kept: list[Tensor] = kept
            ) -> Tensor:
                out = out.clone().requires_grad_(True)
                kept.append(out)
                return out

            handle = modules[name].register_forward_hook(keep)
            loss = nn.functional.cross_entropy(toy(x), y)
            handle.remove()
            (grad,) = torch.autograd.grad(loss, kept)
            expected -= (grad * kept[0]).sum(dim=(0, 2, 3)).detach() / len(batches)
        torch.testing.assert_close(got[name], expected)
    exact = channel_removal_scores(toy, batches, ["down.1"])
    assert torch.corrcoef(torch.stack([got["down.1"], exact["down.1"]]))[0, 1] > 0.5


# ------------------------------------------------------------------------------------------------
# channel_removal_scores: progress bar
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "reference", "taylor"])
def test_progress_bar_only_when_asked(
    toy: ResidualToy, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    batches = make_batches()
    quiet = channel_removal_scores(toy, batches, TOY_INNER, method=method)  # type: ignore[arg-type]
    assert capsys.readouterr() == ("", "")  # the core prints nothing unless asked
    loud = channel_removal_scores(toy, batches, TOY_INNER, method=method, progress=True)  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    # (6 + 6 + 6 + 6 + 10) channels x 2 batches; the bar goes to stderr only
    assert out == "" and "channel removal scores" in err and "/68" in err
    for name in TOY_INNER:
        assert torch.equal(quiet[name], loud[name])


class _Counted(tqdm):
    """A tqdm bar that records ``(n, total)`` when it closes."""

    closed: ClassVar[list[tuple[float, float]]] = []

    def close(self) -> None:
        if not self.disable:
            _Counted.closed.append((self.n, self.total))
        super().close()


def _final_counts(
    monkeypatch: pytest.MonkeyPatch, model: nn.Module, layers: list[str], **kwargs: Any
) -> tuple[float, float]:
    monkeypatch.setattr(scores_module, "tqdm", _Counted)
    _Counted.closed.clear()
    channel_removal_scores(model, make_batches(), layers, progress=True, **kwargs)
    (counts,) = _Counted.closed
    return counts


@pytest.mark.parametrize(
    ("cls", "layers"),
    [
        (ResidualToy, TOY_INNER),  # the fx replay
        (Untraceable, TOY_INNER),  # batched full forwards
        (UpstreamBatchSize, ["block.conv_a", "down"]),  # replay fails, then full forwards
        (DeadBranch, ["side", "block.conv_a"]),  # a layer that does not reach the output
    ],
)
def test_progress_counts_every_channel_once(
    monkeypatch: pytest.MonkeyPatch, cls: type[nn.Module], layers: list[str]
) -> None:
    torch.manual_seed(0)
    model = settle(cls())
    channels = {name: s[1] for name, s in _probe(model, layers).items()}
    n, total = _final_counts(monkeypatch, model, layers, chunk_size=4)
    assert n == total == 2 * sum(channels.values())


def test_progress_rolls_back_a_replay_that_fails_midway(
    toy: ResidualToy, monkeypatch: pytest.MonkeyPatch
) -> None:
    replay = replay_module.GraphReplay.replay
    calls = []

    def second_call_fails(self: Any, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("fails after one chunk")
        return replay(self, *args)

    monkeypatch.setattr(replay_module.GraphReplay, "replay", second_call_fails)
    n, total = _final_counts(monkeypatch, toy, ["down.1"], chunk_size=4)
    assert n == total == 2 * 10


def _probe(model: nn.Module, layers: list[str]) -> dict[str, tuple[int, ...]]:
    with torch.no_grad():
        shapes = output_shapes(model, make_batches(n=1)[0][0], resolve_layers(model, layers))
    return {name: cast(tuple[int, ...], shapes[name][0]) for name in layers}


def test_estimate_passes_progress_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    source = settle(ResidualToy(), torch.float32)
    batches = make_batches(n=2, dtype=torch.float32, classes=3)
    estimate_channel_attention(source, batches, ["down"], 3, epochs=1)
    assert capsys.readouterr() == ("", "")
    estimate_channel_attention(source, batches, ["down"], 3, epochs=1, progress=True)
    assert "channel removal scores" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Torchvision models (float64, all channels of the exact method; a subset of the slow loop)
# ------------------------------------------------------------------------------------------------
RESNET18_LAYERS = ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]
MOBILENET_LAYERS = ["features.3", "features.6", "features.13", "features.17"]
SUBSET = [0, 1, 7]


def _torchvision(name: str, dtype: torch.dtype, **kwargs: float) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)
    gen = torch.Generator().manual_seed(0)
    model.to(dtype).train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32, generator=gen, dtype=dtype))
    return model.eval()


@pytest.mark.parametrize(
    ("name", "layers", "kwargs"),
    [
        ("resnet18", RESNET18_LAYERS, {}),
        ("mobilenet_v2", MOBILENET_LAYERS, {"width_mult": 0.25}),
    ],
)
def test_exact_matches_reference_torchvision(
    name: str, layers: list[str], kwargs: dict[str, float], caplog: pytest.LogCaptureFixture
) -> None:
    model = _torchvision(name, torch.float64, **kwargs)
    batches = make_batches(size=32, batch=2)  # float64 convolutions are slow on the CPU
    with caplog.at_level(logging.WARNING, logger="deltaft.attention"):
        got = channel_removal_scores(model, batches, layers)
    assert no_warnings(caplog)
    expected = ref_removal_scores(copy.deepcopy(model), batches, layers, only=SUBSET)
    for layer in layers:
        torch.testing.assert_close(got[layer][SUBSET], expected[layer], rtol=0, atol=1e-6)


@pytest.mark.heavy  # minutes on 2 cores: `make test-all`, not `make test`
@pytest.mark.parametrize(
    ("name", "layers", "dtype", "atol"),
    [
        ("resnet18", RESNET18_LAYERS, torch.float64, 1e-6),
        ("mobilenet_v2", MOBILENET_LAYERS, torch.float64, 1e-6),
        ("resnet18", RESNET18_LAYERS, torch.float32, 2e-5),
        ("mobilenet_v2", MOBILENET_LAYERS, torch.float32, 2e-5),
    ],
)
def test_exact_matches_reference_torchvision_all_channels(
    name: str, layers: list[str], dtype: torch.dtype, atol: float
) -> None:
    model = _torchvision(name, dtype)
    # float64 convolutions (MobileNet's depthwise ones above all) are slow on the CPU
    batches = make_batches(size=32, batch=2 if dtype == torch.float64 else 4, dtype=dtype)
    got = channel_removal_scores(model, batches, layers)
    expected = ref_removal_scores(copy.deepcopy(model), batches, layers)
    for layer in layers:
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------
# channel_removal_scores: errors
# ------------------------------------------------------------------------------------------------
def test_invalid_arguments(toy: ResidualToy) -> None:
    batches = make_batches(n=1)
    with pytest.raises(ValueError, match="method must be one of exact, reference, taylor"):
        channel_removal_scores(toy, batches, ["stem"], method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_batches must be >= 1, got 0"):
        channel_removal_scores(toy, batches, ["stem"], n_batches=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        channel_removal_scores(toy, batches, ["stem"], chunk_size=0)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        channel_removal_scores(toy, [], ["stem"])
    with pytest.raises(ValueError, match=r"\(x, y\) pairs of tensors, got a sequence of 3"):
        channel_removal_scores(toy, [(*batches[0], 0)], ["stem"])
    with pytest.raises(ValueError, match=r"\(x, y\) pairs of tensors, got <class 'dict'>"):
        channel_removal_scores(toy, [{"x": 1}], ["stem"])


def test_invalid_layers(toy: ResidualToy) -> None:
    batches = make_batches(n=1)
    with pytest.raises(ValueError, match="non-empty list of module names"):
        channel_removal_scores(toy, batches, [])
    with pytest.raises(ValueError, match="non-empty list of module names, got 'stem'"):
        channel_removal_scores(toy, batches, "stem")
    with pytest.raises(ValueError, match="layers must be distinct"):
        channel_removal_scores(toy, batches, ["stem", "stem"])
    with pytest.raises(ValueError, match="'block.conv_c' not found.*close matches: block.conv_"):
        channel_removal_scores(toy, batches, ["block.conv_c"])
    with pytest.raises(ValueError, match=r"'fc' must output a \(B, C, H, W\).*got \(4, 5\)"):
        channel_removal_scores(toy, batches, ["fc"])
    with pytest.raises(ValueError, match="'block' must output .* got Output"):
        channel_removal_scores(_wrap_block_output(toy), batches, ["block"])
    with pytest.raises(ValueError, match="'spare' was not called"):
        toy.spare = nn.Conv2d(3, 3, 1)
        channel_removal_scores(toy, batches, ["spare"])


def _wrap_block_output(toy: ResidualToy) -> nn.Module:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = NamedBlock(toy)

        def forward(self, x: Tensor) -> Tensor:
            return toy.fc(toy.down(self.block(x).logits).mean(dim=(2, 3)))

    return Wrapped()


class NamedBlock(nn.Module):
    def __init__(self, toy: ResidualToy) -> None:
        super().__init__()
        self.toy = toy

    def forward(self, x: Tensor) -> Output:
        out = self.toy.block(self.toy.stem(x))
        return Output(aux=out, logits=out)


def test_layer_called_with_different_channel_counts() -> None:
    class TwoShapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(1)
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(7, NUM_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            a, b = self.pool(x), self.pool(self.conv(x))
            return self.fc(torch.cat([a, b], dim=1).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match=r"'pool' is called 2 times with different .* \[3, 4\]"):
        channel_removal_scores(TwoShapes(), make_batches(n=1, dtype=torch.float32), ["pool"])


def test_batch_mixing_model_is_rejected_by_batched_forwards() -> None:
    class FirstFour(Untraceable):
        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:
                x = x * 2
            h = self.block(self.stem(x[:4]))  # the batch is cut to 4 samples
            return self.fc(self.down(h).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = settle(FirstFour())
    with pytest.raises(
        ValueError,
        match="'block' returned a batch of 4 for an input batch of 8.*method='reference'",
    ):
        channel_removal_scores(model, make_batches(n=1), ["block"], chunk_size=2)


def test_unusable_model_output() -> None:
    class Strings(ResidualToy):
        def forward(self, x: Tensor) -> str:  # type: ignore[override]
            super().forward(x)
            return "logits"

    with pytest.raises(ValueError, match="Expected the model to return logits .* got str"):
        channel_removal_scores(settle(Strings()), make_batches(n=1), ["stem"])


def test_replay_shape_checks() -> None:
    mask = torch.ones(3, 1, 2, 1, 1)
    with pytest.raises(replay_module._ReplayError, match=r"\(K\*B, C, H, W\) output with K = 3"):
        replay_module.mask_replicas(torch.ones(4, 2, 1, 1), mask)
    with pytest.raises(replay_module._ReplayError, match="logits have batch 4, expected 3 x 2"):
        replay_module.replica_losses(torch.ones(4, 5), torch.zeros(2, dtype=torch.long), 3, None)


# ------------------------------------------------------------------------------------------------
# attention_from_scores
# ------------------------------------------------------------------------------------------------
def test_attention_from_scores_matches_numpy_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(7, generator=gen, dtype=torch.float64) * 0.1, "b": torch.rand(3)}
    for temperature in (5.0, 1.0, 0.3):
        got = attention_from_scores(scores, temperature)
        expected = ref_attention_from_scores(scores, temperature)
        assert list(got) == ["a", "b"]
        for name in scores:
            torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-6, atol=1e-7)
            assert abs(float(got[name].sum()) - 1) < 1e-6
        assert got["a"].dtype == torch.float64 and got["b"].dtype == torch.float32


def test_population_std_not_sample_std() -> None:
    scores = {"a": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    # population std 0.5 -> z = [-1, 1] -> w = softmax([-1, 1]) at T = 1
    expected = torch.softmax(torch.tensor([-1.0, 1.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(attention_from_scores(scores, 1.0)["a"], expected)


def test_constant_scores_give_uniform_weights() -> None:
    scores = {"a": torch.full((6,), 0.123456789), "b": torch.zeros(1), "c": torch.tensor([2, 2])}
    got = attention_from_scores(scores)
    assert torch.equal(got["a"], torch.full((6,), 1 / 6))
    assert torch.equal(got["b"], torch.ones(1))
    assert torch.equal(got["c"], torch.full((2,), 0.5))


def test_attention_from_scores_errors() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            attention_from_scores({"a": torch.ones(2)}, bad)
    with pytest.raises(ValueError, match=r"layer 'a' must be a non-empty \(C,\) tensor.*\(2, 2\)"):
        attention_from_scores({"a": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="layer 'a' contain NaN or infinite"):
        attention_from_scores({"a": torch.tensor([1.0, float("inf")])})


# ------------------------------------------------------------------------------------------------
# ChannelAttention
# ------------------------------------------------------------------------------------------------
def make_attention(fingerprint: str = "0123456789abcdef") -> ChannelAttention:
    scores = {"layer1": torch.tensor([0.1, 0.3, 0.2]), "layer2.0": torch.tensor([0.5, -0.1])}
    return ChannelAttention(
        weights=attention_from_scores(scores),
        scores=scores,
        temperature=5.0,
        n_batches=4,
        model_fingerprint=fingerprint,
        data_fingerprint="fedcba9876543210",
        method="exact",
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    attention = make_attention()
    path = tmp_path / "attention.safetensors"
    attention.save(path)
    assert os.listdir(tmp_path) == ["attention.safetensors"]  # no temporary file left
    loaded = ChannelAttention.load(path)
    assert loaded.layers == ["layer1", "layer2.0"]
    assert loaded.channels == {"layer1": 3, "layer2.0": 2}
    for field in ("temperature", "n_batches", "model_fingerprint", "data_fingerprint", "method"):
        assert getattr(loaded, field) == getattr(attention, field)
    for name in attention.layers:
        assert torch.equal(loaded.weights[name], attention.weights[name])
        assert torch.equal(loaded.scores[name], attention.scores[name])
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "deltaft.attention/1"
        assert sorted(handle.keys()) == [
            "scores/layer1",
            "scores/layer2.0",
            "weights/layer1",
            "weights/layer2.0",
        ]


def test_save_overwrites_and_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.safetensors"
    make_attention("1111111111111111").save(path)
    make_attention("2222222222222222").save(path)
    assert ChannelAttention.load(path).model_fingerprint == "2222222222222222"

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(value_module, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        make_attention("3333333333333333").save(path)
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert ChannelAttention.load(path).model_fingerprint == "2222222222222222"


def test_load_checks_layers_channels_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    make_attention().save(path)
    ChannelAttention.load(path, layers=["layer2.0", "layer1"], channels={"layer1": 3})
    with pytest.raises(ValueError, match=r"missing: \['layer3'\], extra: \['layer2.0'\].*re-run"):
        ChannelAttention.load(path, layers=["layer1", "layer3"])
    with pytest.raises(ValueError, match="'layer1' has 4 channels in the model but 3 in the"):
        ChannelAttention.load(path, channels={"layer1": 4})
    with pytest.raises(ValueError, match="estimated for model 0123456789abcdef, but .* ffff"):
        ChannelAttention.load(path, expected_fingerprint="ffff")


def test_load_checks_against_a_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ResidualToy()
    good = ChannelAttention.uniform({"stem.0": 6, "block": 6})
    good = ChannelAttention(
        good.weights, good.scores, 5.0, 1, model_fingerprint(model), "fedcba9876543210", "exact"
    )
    path = tmp_path / "a.safetensors"
    good.save(path)
    assert ChannelAttention.load(path, model=copy.deepcopy(model)).layers == ["stem.0", "block"]
    other = ResidualToy()
    with pytest.raises(ValueError, match="other weights.*re-run `deltaft attention`"):
        ChannelAttention.load(path, model=other)
    ChannelAttention.uniform({"stem.0": 6}).save(path)  # uniform: tied to no model
    ChannelAttention.load(path, model=other)
    ChannelAttention.uniform({"stem.0": 5}).save(path)
    with pytest.raises(ValueError, match="'stem.0' has 6 channels in the model but 5"):
        ChannelAttention.load(path, model=other)
    ChannelAttention.uniform({"stem.9": 5}).save(path)
    with pytest.raises(ValueError, match="'stem.9' not found"):
        ChannelAttention.load(path, model=other)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ChannelAttention.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a deltaft attention file: format None"):
        ChannelAttention.load(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    save_file({"w": torch.ones(2)}, str(corrupt), metadata={"format": "deltaft.attention/1"})
    with pytest.raises(ValueError, match="corrupt deltaft attention file .*'layers'"):
        ChannelAttention.load(corrupt)
    with pytest.raises(FileNotFoundError):
        ChannelAttention.load(tmp_path / "missing.safetensors")


def test_channel_attention_validation() -> None:
    w, s = {"a": torch.full((2,), 0.5)}, {"a": torch.zeros(2)}
    kwargs = {"model_fingerprint": "", "data_fingerprint": "", "method": "exact"}
    with pytest.raises(ValueError, match="must name the same non-empty list of layers"):
        ChannelAttention(w, {"b": torch.zeros(2)}, 5.0, 1, **kwargs)
    with pytest.raises(ValueError, match="must name the same non-empty list of layers"):
        ChannelAttention({}, {}, 5.0, 1, **kwargs)
    with pytest.raises(ValueError, match=r"both have shape \(C,\), got \(2,\) and \(3,\)"):
        ChannelAttention(w, {"a": torch.zeros(3)}, 5.0, 1, **kwargs)
    with pytest.raises(ValueError, match="must be >= 0 and sum to 1, got sum 2"):
        ChannelAttention({"a": torch.ones(2)}, s, 5.0, 1, **kwargs)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ChannelAttention(w, s, 0.0, 1, **kwargs)
    with pytest.raises(ValueError, match="n_batches must be >= 0, got -1"):
        ChannelAttention(w, s, 5.0, -1, **kwargs)


def test_uniform_and_check_compatible() -> None:
    attention = ChannelAttention.uniform({"a": 4, "b": 2})
    assert torch.equal(attention.weights["a"], torch.full((4,), 0.25))
    assert torch.equal(attention.scores["b"], torch.zeros(2))
    assert attention.method == "uniform" and attention.n_batches == 0
    attention.check_compatible(["b", "a"], {"a": 4}, model_fingerprint="anything")
    with pytest.raises(ValueError, match=r"missing: \[\], extra: \['b'\]"):
        attention.check_compatible(["a"])
    with pytest.raises(ValueError, match="Layer 'a' needs >= 1 channel, got 0"):
        ChannelAttention.uniform({"a": 0})


def test_fingerprints() -> None:
    torch.manual_seed(0)
    model = ResidualToy()
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert model_fingerprint(copy.deepcopy(model).eval()) == fingerprint
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc.bias[0] += 1e-6
    assert model_fingerprint(changed) != fingerprint
    batches = make_batches(n=3)
    assert data_fingerprint(batches, 2) == data_fingerprint(iter(batches[:2]), 5)
    assert data_fingerprint(batches, 2) != data_fingerprint(batches, 3)
    assert data_fingerprint(batches, 1) != data_fingerprint(make_batches(n=1, seed=2), 1)


# ------------------------------------------------------------------------------------------------
# estimate_channel_attention
# ------------------------------------------------------------------------------------------------
class Loader:
    """Re-iterable list of batches, counting how often it is iterated."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches
        self.epochs = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.epochs += 1
        return iter(self.batches)


def _bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize("bn", ["adapt", "frozen"])
def test_train_head_trains_only_the_head(bn: str) -> None:
    torch.manual_seed(0)
    source = settle(ResidualToy(), torch.float32)
    loader = Loader(make_batches(n=2, dtype=torch.float32, classes=3))
    trained = estimate_module.train_linear_probe(
        source,
        loader,
        3,
        epochs=2,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        lr_gamma=0.1,
        bn=bn,  # type: ignore[arg-type]
        head=None,
        device=None,
    )
    assert loader.epochs == 2 and not trained.training
    assert trained.fc.out_features == 3 and source.fc.out_features == NUM_CLASSES
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    source_params = dict(source.named_parameters())
    for name, param in trained.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(param, source_params[name]), name
    before, after = _bn_buffers(source), _bn_buffers(trained)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed if bn == "adapt" else not changed


def test_estimate_channel_attention(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    source = settle(ResidualToy(), torch.float32)
    state = copy.deepcopy(source.state_dict())
    batches = make_batches(n=3, dtype=torch.float32, classes=3)
    layers = ["block.conv_a", "down"]
    with caplog.at_level(logging.INFO, logger="deltaft.attention"):
        attention = estimate_channel_attention(
            source, Loader(batches), layers, 3, epochs=2, n_batches=2
        )
    assert "attention head: epoch 2/2, loss" in caplog.text
    for name, value in source.state_dict().items():  # the caller's model is bit-identical
        assert torch.equal(value, state[name]), name
    assert source.fc.out_features == NUM_CLASSES and source.training is False
    assert all(p.requires_grad for p in source.parameters())
    assert attention.layers == layers and attention.channels == {"block.conv_a": 6, "down": 10}
    for name in layers:
        assert abs(float(attention.weights[name].sum()) - 1) < 1e-6
        torch.testing.assert_close(
            attention.weights[name], attention_from_scores(attention.scores)[name]
        )
    assert attention.n_batches == 2 and attention.method == "exact"
    assert attention.temperature == 5.0
    assert attention.model_fingerprint == model_fingerprint(source)
    assert attention.data_fingerprint == data_fingerprint(batches, 2)


def test_estimate_scores_on_score_loader() -> None:
    torch.manual_seed(0)
    source = settle(ResidualToy(), torch.float32)
    train = make_batches(n=2, dtype=torch.float32, classes=3)
    score = make_batches(dtype=torch.float32, seed=5, classes=3)
    attention = estimate_channel_attention(
        source, train, ["down"], 3, epochs=1, score_loader=score, bn="frozen", method="reference"
    )
    assert attention.data_fingerprint == data_fingerprint(score, 4)
    assert attention.n_batches == 2 and attention.method == "reference"


def test_estimate_validates_before_training() -> None:
    source = ResidualToy()
    loader = Loader(make_batches(n=1, dtype=torch.float32, classes=3))
    cases = [
        ({"bn": "train"}, "bn must be one of adapt, frozen; got 'train'"),
        ({"method": "fast"}, "method must be one of exact, reference, taylor"),
        ({"epochs": -1}, "epochs must be >= 0, got -1"),
        ({"lr_gamma": 0.0}, r"lr_gamma must be in \(0, 1\] .*0\.6813.*got 0\.0"),
        ({"lr_gamma": 1.5}, r"lr_gamma must be in \(0, 1\] .*got 1\.5"),
        ({"n_batches": 0}, "n_batches must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"layers": ["nope"]}, "'nope' not found"),
    ]
    for kwargs, message in cases:
        layers = kwargs.pop("layers", ["down"])
        with pytest.raises(ValueError, match=message):
            estimate_channel_attention(source, loader, layers, 3, **kwargs)  # type: ignore[arg-type]
    assert loader.epochs == 0
    with pytest.raises(ValueError, match="loader yielded no batches"):
        estimate_channel_attention(source, [], ["down"], 3, epochs=1)
