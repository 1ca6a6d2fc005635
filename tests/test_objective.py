from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from deltaft import FeatureExtractor, FrozenSource, TransferObjective
from deltaft.regularizers import functional as RF
from tests.conftest import TinyNet

LAYERS = ["conv1", "conv2"]


def _pair(num_classes: int = 4) -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    source = TinyNet(num_classes=5)
    with torch.no_grad():  # non-trivial running statistics, like a pretrained net
        source.train()(torch.randn(8, 3, 16, 16) * 2 + 1)
    source.eval()
    model = copy.deepcopy(source)
    model.fc = nn.Linear(16, num_classes)
    return model, source


def _objective(method: str, source_options=None, **kwargs) -> TransferObjective:  # type: ignore[no-untyped-def]
    """An objective on ``_pair()``; ``source_options`` configure a FrozenSource of its layers."""
    model, source = _pair()
    if method in ("fm", "delta"):
        kwargs.setdefault("layers", LAYERS)
    if method == "delta":
        kwargs.setdefault("attention", "uniform")
    if source_options is not None:
        source = FrozenSource(source, kwargs.get("layers", []), **source_options)
    return TransferObjective(model, source, method, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["l2", "l2sp", "fm", "delta"])
def test_training_step_leaves_source_bit_identical(method: str, batch) -> None:  # type: ignore[no-untyped-def]
    model, source = _pair()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    kwargs = {"layers": LAYERS} if method in ("fm", "delta") else {}
    if method == "delta":
        kwargs["attention"] = "uniform"
    objective = TransferObjective(model, source, method, **kwargs)  # type: ignore[arg-type]
    frozen_before = {k: v.clone() for k, v in objective.source.state_dict().items()}
    optimizer = torch.optim.SGD(objective.param_groups(lr=0.1), lr=0.1, momentum=0.9)
    objective.train()
    for _ in range(2):
        out = objective(*batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    for name, value in source.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in objective.source.state_dict().items():
        assert torch.equal(value, frozen_before[name]), name
    assert not objective.source.training
    assert all(not p.requires_grad for p in objective.source.parameters())
    assert not torch.equal(
        model.fc.weight, objective.source.network.fc.weight[:4]
    )  # the model did train


def test_parts_match_functional(batch) -> None:  # type: ignore[no-untyped-def]
    x, y = batch
    gen = torch.Generator().manual_seed(5)
    weights = {
        "conv1": torch.softmax(torch.randn(8, generator=gen), 0),
        "conv2": torch.softmax(torch.randn(16, generator=gen), 0),
    }
    objective = _objective("delta", attention=weights, alpha=0.3, beta=0.2).train()
    out = objective(x, y)
    model, source = objective.model, objective.source.network
    with FeatureExtractor(model, LAYERS) as fx:
        logits = model(x)
        target = fx.pop()
    with FeatureExtractor(source, LAYERS) as fx, torch.no_grad():
        source(x)
        src = fx.pop()
    head = 0.5 * (model.fc.weight.pow(2).sum() + model.fc.bias.pow(2).sum())
    assert_close(out["task_loss"], nn.functional.cross_entropy(logits, y))
    assert_close(out["reg/delta"], 0.3 * RF.delta_penalty(src, target, weights))
    assert_close(out["reg/head"], 0.2 * head)
    assert_close(out["loss"], out["task_loss"] + out["reg/delta"] + out["reg/head"])
    assert out["reg/delta"] > 0  # BN batch statistics vs running statistics differ at step 0


def test_fm_and_l2sp_parts(batch) -> None:  # type: ignore[no-untyped-def]
    fm = _objective("fm", alpha=0.5, reduction="mean").eval()
    out = fm(*batch)
    # in eval mode with equal backbones the maps agree: no feature-map penalty at step 0
    assert out["reg/fm"].item() == pytest.approx(0.0, abs=1e-10)
    l2sp = _objective("l2sp", alpha=0.5)
    with torch.no_grad():
        l2sp.model.conv1.weight.add_(1.0)
    out = l2sp(*batch)
    assert_close(out["reg/l2sp"], 0.5 * 0.5 * torch.tensor(float(l2sp.model.conv1.weight.numel())))
    assert "reg/l2sp" in out and "reg/head" in out


def test_l2_uses_weight_decay_only(batch) -> None:  # type: ignore[no-untyped-def]
    objective = _objective("l2", weight_decay=1e-3)
    out = objective(*batch)
    assert set(out) == {"loss", "logits", "task_loss"}
    assert_close(out["loss"], out["task_loss"])
    groups = objective.param_groups(lr=0.1, head_lr=1.0)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert [g["weight_decay"] for g in groups] == [1e-3, 1e-3]
    assert [g["lr"] for g in groups] == [0.1, 1.0]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(objective.model.parameters()))
    assert [g["weight_decay"] for g in _objective("delta").param_groups()] == [0.0, 0.0]


def test_source_runs_only_to_last_layer(batch) -> None:  # type: ignore[no-untyped-def]
    objective = _objective("delta", layers=["conv1"])
    ran = []
    objective.source.network.conv2.register_forward_hook(lambda *a: ran.append("conv2"))
    objective(*batch)
    assert ran == []


def test_train_keeps_source_in_eval() -> None:
    objective = _objective("fm")
    objective.train()
    assert objective.model.training and not objective.source.training


def test_inception_style_tuple_output(batch) -> None:  # type: ignore[no-untyped-def]
    class TupleNet(TinyNet):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            logits = super().forward(x)
            return logits, logits * 0

    torch.manual_seed(0)
    source = TupleNet(num_classes=4)
    out = TransferObjective(copy.deepcopy(source), source, "fm", layers=["conv1"])(*batch)
    assert out["logits"].shape == (6, 4)


def test_errors() -> None:
    model, source = _pair()
    with pytest.raises(ValueError, match="method must be one of l2, l2sp, fm, delta"):
        TransferObjective(model, source, "bss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be >= 0, got -1"):
        TransferObjective(model, source, "fm", alpha=-1)
    with pytest.raises(ValueError, match="beta must be >= 0, got nan"):
        TransferObjective(model, source, "fm", beta=float("nan"))
    with pytest.raises(ValueError, match="needs channel attention"):
        TransferObjective(model, source, "delta", layers=LAYERS)
    with pytest.raises(ValueError, match="attention must be 'uniform'"):
        TransferObjective(model, source, "delta", layers=LAYERS, attention="flat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only used by method 'delta'"):
        TransferObjective(model, source, "fm", attention="uniform")
    with pytest.raises(ValueError, match="only used by methods 'fm' and 'delta'"):
        TransferObjective(model, source, "l2", layers=LAYERS)
    with pytest.raises(ValueError, match="has no parameters"):
        TransferObjective(nn.Sequential(model, nn.ReLU()), source, "l2", head="1")
    with pytest.raises(
        ValueError,
        match=r"source to have parameter 'stem.0.weight' of shape \(8, 3, 3, 3\), got \(4, 3",
    ):
        other = TinyNet(width=4)
        TransferObjective(model, other, "l2sp")


def test_folded_source_gives_the_same_penalty(batch) -> None:  # type: ignore[no-untyped-def]
    folded = _objective("delta", layers=["stem.0", "conv2"]).train()
    plain = _objective("delta", {"fold_bn": False}, layers=["stem.0", "conv2"]).train()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.source.modules()) < 3
    assert_close(folded(*batch)["reg/delta"], plain(*batch)["reg/delta"], rtol=1e-5, atol=1e-6)


def test_channels_last_source_gives_the_same_loss_and_gradients(batch) -> None:  # type: ignore[no-untyped-def]
    nhwc = _objective("delta", layers=["stem.0", "conv2"]).train()
    same = _objective("delta", {"channels_last": False}, layers=["stem.0", "conv2"]).train()
    seen: list[torch.Tensor] = []
    handle = nhwc.source.network.get_submodule("conv2").register_forward_hook(
        lambda _m, _i, out: seen.append(out)
    )
    a, b = nhwc(*batch), same(*batch)
    handle.remove()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)
    for key in ("loss", "reg/delta", "task_loss"):
        assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(nhwc.model.named_parameters(), same.model.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def _train_steps(
    objective: TransferObjective, batch, steps: int = 3
) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(objective.param_groups(lr=0.05), lr=0.05, momentum=0.9)
    outs = []
    for _ in range(steps):
        out = objective(*batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        outs.append({k: v.detach() for k, v in out.items()})
    return outs


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_source_gives_the_same_training(batch) -> None:  # type: ignore[no-untyped-def]
    packed = _objective("delta", {"mkldnn": True}).train()
    plain = _objective("delta").train()
    a, b = _train_steps(packed, batch), _train_steps(plain, batch)
    # the oneDNN copy ran steps 2 and 3
    assert packed.source.backend == "onednn"
    assert isinstance(packed.source._packing.network, nn.Module)
    assert plain.source.backend == "plain" and not plain.source._packing.tried
    assert not any("_packing" in key for key in packed.state_dict())  # no submodule, no state
    assert packed.state_dict().keys() == plain.state_dict().keys()
    for step_a, step_b in zip(a, b, strict=True):
        for key in ("loss", "reg/delta", "task_loss"):
            assert_close(step_a[key], step_b[key], rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(packed.model.named_parameters(), plain.model.parameters(), strict=True):
        assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def _assert_plain_source(  # type: ignore[no-untyped-def]
    fast: TransferObjective, plain: TransferObjective, batch, caplog, reason: str
) -> None:
    """``fast`` (mkldnn=True) gave up its packed copy and computes what ``plain`` does."""
    key = "reg/" + fast.method
    with caplog.at_level("INFO", logger="deltaft.source"):
        for _ in range(2):
            assert torch.equal(fast(*batch)[key], plain(*batch)[key])
    assert fast.source.backend == "plain"
    assert fast.source._packing.tried and fast.source._packing.network is None
    if torch.backends.mkldnn.is_available():
        assert f"Plain frozen source: {reason}" in caplog.text


def test_packed_source_falls_back_where_onednn_cannot_run_it(
    batch,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    class Relu6Net(TinyNet):  # ReLU6 (hardtanh) has no oneDNN-tensor kernel, as in MobileNetV2
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(nn.functional.relu6(x))

    torch.manual_seed(0)
    source = Relu6Net(num_classes=5).eval()
    model = copy.deepcopy(source)
    model.fc = nn.Linear(16, 4)
    packed = FrozenSource(source, LAYERS, mkldnn=True)
    fast = TransferObjective(model, packed, "fm", layers=LAYERS).train()
    slow = TransferObjective(model, source, "fm", layers=LAYERS).train()
    _assert_plain_source(fast, slow, batch, caplog, "torch cannot run it with oneDNN")


def test_packed_source_is_dropped_when_its_maps_differ(
    batch,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    objective = _objective("delta", {"mkldnn": True}).train()
    plain = _objective("delta").train()
    packed_maps = FrozenSource._packed_maps
    monkeypatch.setattr(
        FrozenSource,
        "_packed_maps",
        lambda self, packed, x: {k: v + 0.1 for k, v in packed_maps(self, packed, x).items()},
    )
    _assert_plain_source(objective, plain, batch, caplog, "its oneDNN copy differs at 'conv1'")


def test_fold_batchnorm_falls_back_on_untraceable(batch) -> None:  # type: ignore[no-untyped-def]
    from deltaft.source import fold_batchnorm

    class Branchy(TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 1.0
            return super().forward(x)

    net = Branchy().eval()
    out = fold_batchnorm(net, ["conv1"])
    assert isinstance(out, Branchy) and out is not net
    assert_close(out(batch[0]), net(batch[0]))


def test_source_bn_batch_removes_the_step0_mismatch(batch) -> None:  # type: ignore[no-untyped-def]
    running = _objective("delta").train()
    batched = _objective("delta", {"bn": "batch"}).train()
    before = {k: v.clone() for k, v in batched.source.state_dict().items()}
    assert running(*batch)["reg/delta"] > 1e-3
    # equal weights, both normalising with the batch's statistics: the maps agree
    assert batched(*batch)["reg/delta"].item() == pytest.approx(0.0, abs=1e-10)
    for name, value in batched.source.state_dict().items():
        assert torch.equal(value, before[name]), name  # running statistics untouched
    assert all(not m.training for m in batched.source.modules())
    with pytest.raises(ValueError, match="bn must be 'running' or 'batch', got 'train'"):
        _objective("delta", {"bn": "train"})
