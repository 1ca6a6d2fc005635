"""FrozenSource on its own, and how TransferObjective takes one (tests/test_objective.py has the
folding, memory-layout, oneDNN and ``bn`` checks through the loss)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from deltaft import FeatureExtractor, FrozenSource, TransferObjective
from deltaft.attention import ChannelAttention, attention_from_scores, model_fingerprint
from tests.conftest import TinyNet

LAYERS = ["conv1", "conv2"]


def _source() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet(num_classes=5)
    with torch.no_grad():  # non-trivial running statistics, like a pretrained net
        net.train()(torch.randn(8, 3, 16, 16) * 2 + 1)
    return net.eval()


def _attention(fingerprint: str) -> ChannelAttention:
    gen = torch.Generator().manual_seed(3)
    scores = {"conv1": torch.randn(8, generator=gen), "conv2": torch.randn(16, generator=gen)}
    return ChannelAttention(
        weights=attention_from_scores(scores),
        scores=scores,
        temperature=5.0,
        n_batches=1,
        model_fingerprint=fingerprint,
        data_fingerprint="",
        method="exact",
    )


def test_maps_are_the_eval_networks_and_nothing_trains(batch) -> None:  # type: ignore[no-untyped-def]
    net = _source().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    source = FrozenSource(net, ["conv2", "stem.0"])
    maps = source(batch[0], target_training=True)
    reference = copy.deepcopy(net).eval()
    with FeatureExtractor(reference, ["conv2", "stem.0"]) as hooks, torch.no_grad():
        reference(batch[0])
        want = hooks.pop()
    assert list(maps) == ["conv2", "stem.0"]
    for name, value in want.items():
        assert_close(maps[name], value, rtol=1e-5, atol=1e-6)
        assert not maps[name].requires_grad
    assert net.training  # the argument is copied, not changed
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not source.train().training and not source.network.training
    assert all(not p.requires_grad for p in source.parameters())


def test_no_layers_runs_nothing_and_keeps_the_weights(batch) -> None:  # type: ignore[no-untyped-def]
    net = _source()
    source = FrozenSource(net)
    assert source.layers == [] and source(batch[0]) == {}
    assert source.state_dict().keys() == {f"network.{k}" for k in net.state_dict()}
    for name, value in net.state_dict().items():  # nothing folded: L2-SP's reference
        assert torch.equal(source.network.state_dict()[name], value), name


def test_fingerprint_is_of_the_weights_before_folding() -> None:
    net = _source()
    folded = FrozenSource(net, LAYERS)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) < 3
    assert folded.fingerprint() == model_fingerprint(net)
    assert FrozenSource(net, LAYERS, fold_bn=False).fingerprint() == model_fingerprint(net)
    assert FrozenSource(net).fingerprint() == model_fingerprint(net)


def test_backend_and_options() -> None:
    net = _source()
    assert FrozenSource(net, LAYERS).backend == "plain"
    assert FrozenSource(net, LAYERS, mkldnn=True).backend == "undecided"
    batched = FrozenSource(net, LAYERS, bn="batch")  # BatchNorm kept: batch statistics need it
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batched.modules()) == 3
    with pytest.raises(ValueError, match="bn must be 'running' or 'batch', got 'eval'"):
        FrozenSource(net, LAYERS, bn="eval")  # type: ignore[arg-type]


def test_objective_takes_a_configured_source(batch) -> None:  # type: ignore[no-untyped-def]
    net = _source()
    model = copy.deepcopy(net)
    model.fc = nn.Linear(16, 4)
    source = FrozenSource(net, LAYERS, truncate=False)
    objective = TransferObjective(model, source, "fm")
    assert objective.source is source and objective.layers == LAYERS  # its layers by default
    plain = TransferObjective(copy.deepcopy(model), net, "fm", layers=LAYERS)
    assert_close(objective(*batch)["reg/fm"], plain(*batch)["reg/fm"])
    with pytest.raises(ValueError, match=r"computes the maps of layers \['conv1', 'conv2'\], but"):
        TransferObjective(model, source, "fm", layers=["conv1"])


def test_attention_is_checked_against_the_unfolded_weights() -> None:
    net = _source()
    model = copy.deepcopy(net)
    model.fc = nn.Linear(16, 4)
    source = FrozenSource(net, LAYERS)  # folded: its own weights hash differently
    attention = _attention(model_fingerprint(net))
    objective = TransferObjective(model, source, "delta", attention=attention)
    assert list(objective.terms) == ["reg/delta", "reg/head"]
    with pytest.raises(ValueError, match="estimated for model 0123456789abcdef"):
        TransferObjective(model, source, "delta", attention=_attention("0123456789abcdef"))
    with pytest.raises(ValueError, match="estimated for model 0123456789abcdef"):
        TransferObjective(model, net, "delta", attention=_attention("0123456789abcdef"))


def test_l2sp_refuses_a_folded_source() -> None:
    net = _source()
    model = copy.deepcopy(net)
    model.fc = nn.Linear(16, 4)
    with pytest.raises(ValueError, match="L2-SP needs the source to have parameter 'stem.1.w"):
        TransferObjective(model, FrozenSource(net, LAYERS), "l2sp")
