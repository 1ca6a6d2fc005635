"""Every paper preset trains end to end: one iteration on fake data with random weights.

The presets' own image sizes (224 / 299) and batch 64 are far too slow for CPU tests: the size,
batch and amount of data are overridden here, everything else (model, layers, transforms, schedule,
alpha, beta) is the preset's. The attention is estimated with the first-order method for speed;
the exact method runs once on Inception-V3, whose attention step crashes in the reference code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torchvision

from deltaft.app.config import TrainConfig, load_config
from deltaft.attention import ChannelAttention
from deltaft.layers import default_layers
from tests.cli_support import one_thread, restore_logging, run_main  # noqa: F401 (autouse fixtures)

ROOT = Path(__file__).resolve().parents[1]
PAPER_PRESETS = sorted(
    [*(ROOT / "configs" / "paper").glob("*.yaml"), *(ROOT / "configs").glob("paper*.yaml")]
)
# The smallest sizes each network accepts, to keep a CPU forward pass cheap.
SMALL_IMAGE = {"resnet50": 64, "resnet101": 64, "inception_v3": 75}
REFERENCE_LAYERS = {
    "resnet50": ["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"],
    "resnet101": ["layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3", "layer4.2.conv3"],
    "inception_v3": ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"],
}


def _one_iteration(
    capsys: pytest.CaptureFixture[str], preset: Path, out: Path, attention_method: str
) -> tuple[dict[str, object], dict[str, object]]:
    model = load_config(preset)["model"]
    code, _, err = run_main(
        capsys,
        "train",
        "--config",
        str(preset),
        "--weights",
        "none",
        "--data",
        "tv:FakeData",
        "--per-class",
        "2",
        "--iterations",
        "1",
        "--batch-size",
        "2",
        "--image-size",
        str(SMALL_IMAGE[model]),
        "--attention-epochs",
        "1",
        "--attention-batches",
        "1",
        "--attention-method",
        attention_method,
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    stored = load_config(out / "config.yaml")
    return summary, stored


def test_there_is_a_preset_per_model_and_paper_dataset() -> None:
    names = {p.stem for p in (ROOT / "configs" / "paper").glob("*.yaml")}
    datasets = ("caltech256", "dogs", "indoor67", "cub200", "food101")
    assert names == {f"{m}_{d}" for m in ("resnet101", "inception_v3") for d in datasets}


def _first_of_each_model(presets: list[Path]) -> set[Path]:
    firsts: dict[str, Path] = {}
    for preset in presets:
        firsts.setdefault(str(load_config(preset)["model"]), preset)
    return set(firsts.values())


# Training one iteration costs 15-40 s a preset on 2 cores; the presets of one model differ only
# in settings, which test_every_paper_preset_is_a_valid_configuration checks for all of them. So
# `make test` trains the first preset of each model and `make test-all` every one.
_TRAINED_IN_CI = _first_of_each_model(PAPER_PRESETS)


def test_every_paper_preset_is_a_valid_configuration(tmp_path: Path) -> None:
    for preset in PAPER_PRESETS:
        settings = load_config(preset)
        required = {"data": "tv:FakeData", "out": str(tmp_path / "run")}
        cfg = TrainConfig.from_sources(required, settings)  # the preset's data wins
        assert cfg.model in REFERENCE_LAYERS, preset
        assert cfg.spec.base == "delta" and cfg.preset == "paper", preset
        for key, value in settings.items():
            assert getattr(cfg, key) == value, (preset, key)


@pytest.mark.parametrize(
    "preset",
    [p if p in _TRAINED_IN_CI else pytest.param(p, marks=pytest.mark.heavy) for p in PAPER_PRESETS],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_paper_preset_trains_one_iteration(
    preset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_config(preset)
    summary, stored = _one_iteration(capsys, preset, tmp_path / "run", "taylor")
    model = settings["model"]
    assert summary["method"] == "delta"
    assert summary["model"] == model
    assert summary["steps"] == 1
    assert summary["layers"] == REFERENCE_LAYERS[model]
    assert summary["test_accuracy"] is not None
    # The preset's protocol survives the overrides: strengths, schedule and transforms.
    for key in ("alpha", "beta", "lr", "schedule", "step_at", "preset"):
        if key in settings:
            assert stored[key] == settings[key], key
    assert stored["preset"] == "paper"
    assert (tmp_path / "run" / "attention.safetensors").is_file()


def test_reference_layers_are_the_defaults_of_the_paper_models() -> None:
    assert default_layers(torchvision.models.resnet101()) == REFERENCE_LAYERS["resnet101"]
    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    assert default_layers(inception) == REFERENCE_LAYERS["inception_v3"]


def test_inception_v3_exact_attention_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The step that crashes in the reference code: channel removal on Inception-V3's layers."""
    preset = ROOT / "configs" / "paper" / "inception_v3_cub200.yaml"
    summary, _ = _one_iteration(capsys, preset, tmp_path / "run", "exact")
    assert summary["steps"] == 1
    assert summary["attention_seconds"] > 0
    attention = ChannelAttention.load(tmp_path / "run" / "attention.safetensors")
    channels = [64, 192, 288, 768]
    assert attention.channels == dict(zip(REFERENCE_LAYERS["inception_v3"], channels, strict=True))
    for w in attention.weights.values():
        assert abs(float(w.sum()) - 1.0) < 1e-5
        assert bool((w >= 0).all())
