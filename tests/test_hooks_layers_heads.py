from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deltaft import FeatureExtractor, default_layers, find_head, replace_head, validate_layers
from deltaft._utils import get_submodule, set_submodule
from deltaft.heads import head_parameter_names
from deltaft.layers import describe_layers

TV = torchvision.models

# The reference tables of DESIGN.md, name for name.
REFERENCE_TABLES = {
    "resnet50": ["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"],
    "resnet101": ["layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3", "layer4.2.conv3"],
    "inception_v3": ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"],
}


@pytest.mark.parametrize("name", sorted(REFERENCE_TABLES))
def test_reference_layer_tables(name: str) -> None:
    kwargs = {"init_weights": False} if name == "inception_v3" else {}
    model = getattr(TV, name)(weights=None, **kwargs)
    assert default_layers(model) == REFERENCE_TABLES[name]


def test_reference_layers_have_reference_channels() -> None:
    shapes = validate_layers(TV.resnet50(), REFERENCE_TABLES["resnet50"], input_size=64)
    assert [s[1] for s in shapes.values()] == [256, 512, 1024, 2048]
    model = TV.inception_v3(weights=None, init_weights=False, aux_logits=False)
    shapes = validate_layers(model, REFERENCE_TABLES["inception_v3"], input_size=299)
    assert [s[1] for s in shapes.values()] == [64, 192, 288, 768]


@pytest.mark.parametrize(
    ("ctor", "expected"),
    [
        (TV.resnet18, ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]),
        (TV.mobilenet_v2, ["features.3", "features.6", "features.13", "features.17"]),
        (TV.efficientnet_b0, ["features.2", "features.3", "features.5", "features.7"]),
    ],
)
def test_default_layers_by_rule(ctor, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert default_layers(ctor()) == expected


def test_default_layers_generic_rule_on_plain_cnn() -> None:
    # A plain Sequential: stride-2 stem, then stages at /4 and /8 of two blocks each.
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())

    body = nn.Sequential(block(3, 4, 2), block(4, 8, 2), block(8, 8, 1), block(8, 16, 2))
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    assert default_layers(model, input_size=32) == ["0.2", "0.3"]


def test_describe_layers_records_shapes_and_restores_mode(tiny_net: nn.Module) -> None:
    tiny_net.train()
    infos = {i.name: i for i in describe_layers(tiny_net, input_size=16)}
    assert tiny_net.training
    assert infos["conv2"].shape == (1, 16, 8, 8)
    assert infos["fc"].shape == (1, 4)


def test_validate_layers_errors(tiny_net: nn.Module) -> None:
    with pytest.raises(ValueError, match="close matches: conv1"):
        validate_layers(tiny_net, ["conv11"], input_size=16)
    with pytest.raises(ValueError, match=r"'fc' of TinyNet gave shape \(1, 4\)"):
        validate_layers(tiny_net, ["fc"], input_size=16)
    with pytest.raises(ValueError, match=r"non-empty list of module names, got \[\]"):
        validate_layers(tiny_net, [], input_size=16)
    with pytest.raises(ValueError, match=r"layers must be distinct, got \['conv1', 'conv1'\]"):
        validate_layers(tiny_net, ["conv1", "conv1"], input_size=16)
    assert validate_layers(tiny_net, "conv1", input_size=16) == {"conv1": (1, 8, 16, 16)}


def test_default_layers_error_without_4d_outputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(ValueError, match=r"outputs a \(B, C, H, W\) feature map"):
        default_layers(model, input_size=8)


def test_feature_extractor_captures_and_clears(tiny_net: nn.Module, batch) -> None:  # type: ignore[no-untyped-def]
    x, _ = batch
    with FeatureExtractor(tiny_net, ["conv1", "stem.2"]) as fx:
        tiny_net(x)
        maps = fx.pop()
        assert list(maps) == ["conv1", "stem.2"]
        assert maps["conv1"].shape == (6, 8, 16, 16)
        with pytest.raises(RuntimeError, match="produced no output"):
            fx.pop()  # cleared on read
    assert all(not m._forward_hooks for m in tiny_net.modules())  # hooks removed on exit


def test_feature_extractor_stop_after_last(tiny_net: nn.Module, batch) -> None:  # type: ignore[no-untyped-def]
    x, _ = batch
    calls = []
    tiny_net.fc.register_forward_hook(lambda *a: calls.append(1))
    with FeatureExtractor(tiny_net, ["conv1"], stop_after_last=True) as fx:
        assert fx.run(x) is None
        assert fx.pop()["conv1"].shape[1] == 8
    assert calls == []  # the head never ran
    with FeatureExtractor(tiny_net, "conv1") as fx:
        assert fx.run(x).shape == (6, 4)


def test_feature_extractor_errors(tiny_net: nn.Module, batch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not found in TinyNet; close matches: conv2, conv1"):
        FeatureExtractor(tiny_net, ["conv"])
    with pytest.raises(ValueError, match=r"non-empty list of module names, got \[\]"):
        FeatureExtractor(tiny_net, [])
    with pytest.raises(ValueError, match=r"layers must be distinct, got \['conv1', 'conv1'\]"):
        FeatureExtractor(tiny_net, ["conv1", "conv1"])
    fx = FeatureExtractor(tiny_net, ["conv1"])
    with fx, pytest.raises(RuntimeError, match="not re-entrant"):
        fx.__enter__()

    class DictOut(nn.Module):  # a plain tuple is read by its first element (test_hf.py)
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": x}

    model = nn.Sequential(DictOut())
    with FeatureExtractor(model, ["0"]), pytest.raises(TypeError, match="expected a Tensor"):
        model(batch[0])


def test_find_and_replace_head() -> None:
    assert find_head(TV.resnet18()) == "fc"
    assert find_head(TV.mobilenet_v2()) == "classifier.1"
    model = TV.mobilenet_v2()
    assert replace_head(model, 7) == "classifier.1"
    assert model.classifier[1].out_features == 7
    assert head_parameter_names(model, "classifier.1") == [
        "classifier.1.weight",
        "classifier.1.bias",
    ]
    set_submodule(model, "classifier.0", nn.Identity())
    assert isinstance(get_submodule(model, "classifier.0"), nn.Identity)


def test_head_errors(tiny_net: nn.Module) -> None:
    with pytest.raises(ValueError, match="No nn.Linear classifier head"):
        find_head(nn.Sequential(nn.Conv2d(3, 3, 3)))  # a 1x1 conv would be a conv classifier
    with pytest.raises(ValueError, match="not found in TinyNet"):
        find_head(tiny_net, "head")
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        replace_head(tiny_net, 0)
    with pytest.raises(ValueError, match="expected nn.Linear"):
        replace_head(tiny_net, 3, head="conv1")
