"""Clear errors for backbones the build step cannot use as they are (issue #11): an input size
the model cannot take, and conv-classifier heads.

The toy factories here are importable as ``--model tests.test_backbone_errors:NAME``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

from deltaft.app.backbone_checks import check_input_size, declared_input_sizes, head_as_setting
from deltaft.app.build import build_run
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError
from deltaft.heads import HeadError, find_head, head_parameter_names, replace_head
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    MODEL,
    load_state,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)

timm = pytest.importorskip("timm")


class FixedSizeNet(nn.Module):
    """A conv and an ``nn.Linear`` on the flattened map: only ``side`` x ``side`` images fit.

    ``declare`` sets ``image_size`` (as torchvision's ViT does) or a timm-style
    ``pretrained_cfg``; ``None`` declares nothing.
    """

    def __init__(self, side: int = 32, declare: str | None = None, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * (side // 2) ** 2, num_classes)
        if declare == "image_size":
            self.image_size = side
        elif declare == "pretrained_cfg":
            self.pretrained_cfg = {"input_size": (3, side, side)}

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))  # (B, 4 * (S/2)^2) -> (B, K)


def fixed_size_net(num_classes: int = 10) -> nn.Module:
    """A :class:`FixedSizeNet` for 32 px that declares nothing."""
    return FixedSizeNet(32, None, num_classes)


def small_vit(num_classes: int = 10) -> nn.Module:
    """A timm ViT for 32 px images (patch 8, depth 2, width 16): fixed-size, like ViT-B at 224."""
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=num_classes
    )


def _small_swin() -> nn.Module:
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1)
    )


def _small_tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )


@pytest.mark.parametrize(
    ("declare", "named"),
    [
        ("image_size", r"it takes 32x32 \(its image_size\): pass image_size 32\."),
        ("pretrained_cfg", r'it takes 32x32 \(its pretrained_cfg\["input_size"\]\)'),
        (None, "pass image_size with the side the model was built for"),
    ],
)
def test_fixed_size_toy_is_refused_with_the_size_it_takes(declare: str | None, named: str) -> None:
    model = FixedSizeNet(32, declare).train()
    expected = rf"toy cannot take 64x64 images \(RuntimeError: .*{named}"
    with pytest.raises(SettingError, match=expected):
        check_input_size(model, 64, name="toy", native=224)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_input_size(model, 32, name="toy", native=224)  # the size it takes: nothing raised
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_native_size_is_named_when_nothing_is_declared() -> None:
    """A model that declares no size: the weights' size (``native``) is named once it runs."""
    with pytest.raises(SettingError, match=r"it takes 32x32 \(the size of its weights' trans"):
        check_input_size(FixedSizeNet(32), 48, name="toy", native=32)


@pytest.mark.parametrize(
    ("build", "side", "cause", "named"),
    [
        (small_vit, 64, "AssertionError: Input height", "32x32 (its patch embedding's img_size)"),
        (_small_swin, 64, "AssertionError: Input height", "32x32 (its patch embedding's img_size)"),
        (_small_tv_vit, 64, "AssertionError: Wrong image height", "32x32 (its image_size)"),
        (torchvision.models.convnext_tiny, 16, "RuntimeError: Calc", "224x224 (the size of its"),
    ],
)
def test_library_backbones_at_a_size_they_cannot_take(
    build: Any, side: int, cause: str, named: str
) -> None:
    model = build()
    with pytest.raises(SettingError) as info:
        check_input_size(model, side, name="m", native=224)
    text = str(info.value)
    assert text.startswith(f"m cannot take {side}x{side} images ({cause}")
    assert f"it takes {named}" in text and "\n" not in text


def test_declared_sizes_of_timm_and_torchvision_models() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    assert list(declared_input_sizes(vit)) == [
        (32, "its patch embedding's img_size"),
        (224, 'its pretrained_cfg["input_size"]'),  # timm keeps the weights' size here
    ]
    assert [s for s, _ in declared_input_sizes(_small_tv_vit())] == [32]
    dynamic = timm.create_model("vit_tiny_patch16_224", depth=1, dynamic_img_size=True)
    assert [s for s, _ in declared_input_sizes(dynamic)] == [224]  # not strict: weights' size only
    assert list(declared_input_sizes(torchvision.models.resnet18())) == []


def test_cli_wrong_size_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train`` (a method without layers: the check does not rely on a layer forward),
    ``attention`` and ``layers`` refuse 64 px for a 32 px ViT, naming ``--image-size 32``;
    Inception-V3 at 64 px names 299."""
    write_images(tmp_path / "data", "train", 2, 0)
    model = "tests.test_backbone_errors:small_vit"
    common = ("--data", str(tmp_path / "data"), "--model", model, "--image-size", "64")
    expected = "it takes 32x32 (its patch embedding's img_size): pass --image-size 32."
    for argv in (
        ("train", *common, "--method", "l2", "--out", str(tmp_path / "run"), "--workers", "0"),
        ("attention", *common, "--out", str(tmp_path / "a.pt"), "--workers", "0"),
        ("layers", "--model", model, "--image-size", "64"),
    ):
        code, _, err = run_main(capsys, *argv, "--quiet")
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert expected in err and "cannot take 64x64 images" in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))
    code, _, err = run_main(
        capsys, "layers", "--model", "inception_v3", "--image-size", "64", "--quiet"
    )
    assert code == 2 and "pass --image-size 299." in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------
# Conv-classifier heads (SqueezeNet: classifier = Dropout, 1x1 Conv2d, ReLU, AdaptiveAvgPool2d)


def test_conv_head_is_found_and_rebuilt_with_the_target_classes() -> None:
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0()
    assert find_head(model) == "classifier.1"  # no nn.Linear; the last layer is a 1x1 conv
    assert replace_head(model, 3) == "classifier.1"
    new = model.classifier[1]
    assert isinstance(new, nn.Conv2d) and new.weight.shape == (3, 512, 1, 1)
    assert new.bias is not None and new.weight.requires_grad
    assert head_parameter_names(model, "classifier.1") == [
        "classifier.1.weight",
        "classifier.1.bias",
    ]
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    # a named conv head of the right kind, in a model that also has an nn.Linear
    mixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1, bias=False), nn.Flatten())
    mixed.append(nn.Linear(5, 2))
    assert replace_head(mixed, 7, head="1") == "1"
    assert mixed[1].weight.shape == (7, 4, 1, 1) and mixed[1].bias is None


@pytest.mark.parametrize(
    ("model", "head", "match"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), None, "No nn.Linear classifier"),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), None, "not a 1x1 nn.Conv2d classifier"),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), "0", "Head '0' is a Conv2d, expected nn.Linear"),
        (nn.Sequential(nn.Conv2d(3, 4, 1, stride=2)), "0", "expected nn.Linear or a 1x1"),
        (nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)), "0", "one group"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), "1", "Head '1' is a ReLU"),
    ],
)
def test_heads_that_cannot_be_rebuilt(model: nn.Module, head: str | None, match: str) -> None:
    with pytest.raises(HeadError, match=match) as info:
        replace_head(model, 2, head=head)
    assert str(info.value).endswith("name the classifier module with head='NAME'.")
    with pytest.raises(SettingError) as setting, head_as_setting():
        replace_head(model, 2, head=head)
    rendered = setting.value.render(lambda key: "--" + key)
    assert rendered.endswith("; pass --head NAME to name the classifier module.")
    assert "head='" not in rendered


def test_cli_layers_and_delta_on_squeezenet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``layers`` needs no head and takes ``--head``; ``train --method delta`` replaces the
    1x1 conv classifier (in the attention estimate and in the trained model)."""
    code, out, err = run_main(capsys, "layers", "--model", "squeezenet1_0", "--image-size", "64")
    assert code == 0, err
    assert "* features.12 " in out and out.splitlines()[-2].endswith("--head): classifier.1")
    code, out, _ = run_main(
        capsys, "layers", "--model", "squeezenet1_0", "--image-size", "64", "--head", "classifier.1"
    )
    assert code == 0 and "features.5,features.10,features.12" in out
    code, _, err = run_main(
        capsys, "layers", "--model", "squeezenet1_0", "--image-size", "64", "--head", "features.0",
        "--quiet",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "Head 'features.0' is a Conv2d" in err and "pass --head NAME" in err, err
    data, run = tmp_path / "data", tmp_path / "run"
    write_images(data, "train", 2, 0)
    write_images(data, "test", 1, 1)
    code, _, err = run_main(
        capsys, "train", "--data", str(data), "--model", "squeezenet1_0", "--weights", "none",
        "--image-size", "64", "--method", "delta", "--layers", "features.3", "--iterations", "1",
        "--batch-size", "4", "--attention-epochs", "1", "--attention-batches", "1",
        "--workers", "0", "--out", str(run), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    state = load_state(run / "checkpoints" / "last.pt")
    assert state["head"] == "classifier.1"
    assert state["model"]["classifier.1.weight"].shape == (4, 512, 1, 1)  # 4 classes


# ------------------------------------------------------------------------------------------
# The "Built ..." line


@pytest.mark.parametrize(("image_size", "shown"), [(None, 224), (40, 40)])
def test_built_line_shows_the_size_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, image_size: int | None, shown: int
) -> None:
    write_images(tmp_path, "train", 1, 0)
    cfg = TrainConfig(
        data=str(tmp_path), model=MODEL, out="unused", image_size=image_size, workers=0
    )
    with caplog.at_level(logging.INFO, logger="deltaft"):
        built = build_run(cfg, torch.device("cpu"))
    assert built.image_size == shown
    lines = [r.getMessage() for r in caplog.records if r.name == "deltaft.app.build"]
    built_lines = [line for line in lines if line.startswith("Built ")]
    assert built_lines == [f"Built {MODEL} (factory weights, head fc, input {shown})."], lines


def test_bss_lwf_and_cotuning_refuse_a_conv_classifier() -> None:
    """A 1x1 conv head's input is a map and its output precedes pooling: neither is what BSS,
    LwF or Co-Tuning use, so they are refused rather than computed on the wrong tensor."""
    import copy

    from deltaft.objective import TransferObjective

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )  # fmt: skip

    source = net()
    relationship = torch.full((4, 4), 0.25)
    for method, extra in (
        ("l2", {"bss": 0.001}),
        ("lwf", {}),
        ("cotuning", {"relationship": relationship}),
    ):
        with pytest.raises(ValueError, match=r"need an nn.Linear classifier head.*Conv2d"):
            TransferObjective(copy.deepcopy(source), source, method, input_size=16, **extra)  # type: ignore[arg-type]
    TransferObjective(copy.deepcopy(source), source, "l2", input_size=16)  # plain methods work
