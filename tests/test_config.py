from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deltaft.app.config import DEFAULT_EPOCHS, RUNTIME_KEYS, TrainConfig, load_config
from deltaft.app.config import REQUIRED as REQUIRED_KEYS
from deltaft.app.data import build_datasets, check_sampling, stratified_indices, train_transform
from deltaft.app.errors import SettingError
from tests.cli_support import raises_rendered

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"data": "imgs", "model": "resnet18", "out": "runs/x"}


def _cfg(**changes: Any) -> TrainConfig:
    return TrainConfig(**{**REQUIRED, **changes})


def test_defaults_match_the_reference_protocol() -> None:
    cfg = _cfg()
    assert (cfg.method, cfg.alpha, cfg.beta, cfg.lr, cfg.momentum) == (
        "delta",
        0.01,
        0.01,
        0.01,
        0.9,
    )
    assert (cfg.epochs, cfg.iterations, cfg.schedule) == (DEFAULT_EPOCHS, None, "step")
    assert cfg.step_at == pytest.approx(2 / 3)
    assert (cfg.temperature, cfg.bn, cfg.reduction, cfg.attention_batches) == (
        5.0,
        "adapt",
        "sum",
        4,
    )


def test_flags_override_the_file_and_yaml_strings_are_coerced() -> None:
    file = {"alpha": "1e-4", "lr": 0.1, "layers": "a, b", "epochs": 3, "batch-size": 16}
    cfg = TrainConfig.from_sources(file, {**REQUIRED, "lr": 0.05, "iterations": 100})
    assert cfg.alpha == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.lr == 0.05
    assert cfg.layers == ["a", "b"]
    assert cfg.batch_size == 16
    assert (cfg.epochs, cfg.iterations) == (None, 100)  # --iterations replaces the file's epochs


def test_per_class_flag_replaces_the_files_fraction() -> None:
    cfg = TrainConfig.from_sources({"fraction": 0.5}, {**REQUIRED, "per_class": 30})
    assert (cfg.per_class, cfg.fraction) == (30, None)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = _cfg(method="l2sp", layers=["x", "y"], per_class=5, amp="bf16", head="fc")
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_sources(load_config(path)) == cfg


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_every_preset_file_is_valid(path: Path) -> None:
    cfg = TrainConfig.from_sources(load_config(path), REQUIRED)
    assert isinstance(cfg, TrainConfig)


def test_presets_exist() -> None:
    assert {"default.yaml", "paper.yaml"} <= {p.name for p in (ROOT / "configs").glob("*.yaml")}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"alpha": -1.0}, r"--alpha must be >= 0, got -1.0"),
        ({"beta": float("nan")}, r"--beta must be >= 0"),
        ({"lr": 0.0}, r"--lr must be > 0"),
        (
            {"method": "delta2"},
            r"--method: Unknown base method 'delta2' in 'delta2'; expected a base",
        ),
        ({"optimizer": "adam"}, r"--optimizer must be one of sgd, adamw"),
        ({"schedule": "linear"}, r"--schedule must be one of step, exponential, cosine"),
        ({"amp": "fp8"}, r"--amp must be one of none, bf16, fp16"),
        ({"epochs": 2, "iterations": 5}, r"either --epochs or --iterations, not both"),
        ({"per_class": 5, "fraction": 0.5}, r"either --per-class or --fraction, not both"),
        ({"fraction": 1.5}, r"--fraction must be in \(0, 1\]"),
        ({"per_class": 0}, r"--per-class must be >= 1, got 0"),
        ({"image_size": 7}, r"--image-size must be >= 8, got 7"),
        ({"val_split": 1.0}, r"--val-split must be in \[0, 1\)"),
        ({"hflip": 1.5}, r"--hflip must be in \[0, 1\], got 1.5"),
        ({"crop_scale": 0.0}, r"--crop-scale must be in \(0, 1\]"),
        ({"crop_scale": 0.5, "preset": "paper"}, r"paper preset crops a fixed size"),
        ({"batch_size": 0}, r"--batch-size must be >= 1"),
        ({"epochs": 0}, r"--epochs must be >= 1"),
        ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
        ({"step_at": 1.0}, r"--step-at must be in \(0, 1\)"),
        ({"temperature": 0.0}, r"--temperature must be > 0"),
        ({"layers": ["a", "a"]}, r"--layers must name distinct modules"),
        ({"layers": "a,,b"}, r"--layers must be non-empty names"),
        ({"batch_size": "big"}, r"--batch-size must be an integer, got 'big'"),
        ({"alpha": "x"}, r"--alpha must be a number, got 'x'"),
        ({"resume": "yes"}, r"--resume must be true or false"),
        ({"device": "gpu0"}, r"--device 'gpu0' is not a device"),
        ({"data": ""}, r"--data must not be empty"),
    ],
)
def test_invalid_values_are_user_errors(changes: dict[str, Any], match: str) -> None:
    with raises_rendered(SettingError, match):
        _cfg(**changes)


def test_unknown_key_lists_the_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("alpah: 0.1\nlr: 0.1\n")
    expected = (
        r"'alpah' \(did you mean 'alpha'\?\) in config file .*c\.yaml; valid settings: alpha, "
    )
    with raises_rendered(ValueError, expected):
        load_config(path)
    with raises_rendered(ValueError, r"Unknown setting\(s\) 'nope'"):
        TrainConfig.from_sources({"nope": 1}, REQUIRED)


def test_missing_required_settings() -> None:
    with raises_rendered(SettingError, r"Missing required setting\(s\) --data, --out"):
        TrainConfig.from_sources({"model": "resnet18"})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lr: [0.1\n", r"not valid YAML at line 2"),
        ("- 1\n- 2\n", r"must be a mapping of settings .*got list"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with raises_rendered(ValueError, match):
        load_config(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with raises_rendered(SettingError, r"does not exist; check the --config path"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == {}


def test_differences_ignore_runtime_settings() -> None:
    cfg = _cfg(workers=0, device="cpu", resume=True)
    stored = _cfg(workers=4, device="auto", alpha=0.1).to_dict()
    assert cfg.differences(stored) == {"alpha": (0.1, 0.01)}


def test_default_yaml_states_every_default() -> None:
    """configs/default.yaml holds every setting at its dataclass default, and nothing else."""
    text = (ROOT / "configs" / "default.yaml").read_text()
    stated = yaml.safe_load(text)
    assert load_config(ROOT / "configs" / "default.yaml") == stated  # no unknown keys
    defaults = TrainConfig(**REQUIRED).to_dict()  # epochs resolved to DEFAULT_EPOCHS
    expected = {key: value for key, value in defaults.items() if key not in REQUIRED_KEYS}
    assert stated == expected
    assert TrainConfig.from_sources(stated, REQUIRED) == TrainConfig(**REQUIRED)


def test_key_sets_derive_from_the_fields() -> None:
    assert REQUIRED_KEYS == ("data", "model", "out")
    assert {
        "amp", "channels_last", "data_root", "device", "download", "out", "resume",
        "source_mkldnn", "workers",
    } == RUNTIME_KEYS  # fmt: skip


def test_setting_errors_name_settings_not_flags() -> None:
    with pytest.raises(SettingError) as info:
        _cfg(epochs=2, iterations=5)
    assert str(info.value) == (
        "Give either epochs or iterations, not both (got epochs=2, iterations=5)."
    )
    assert info.value.settings == ("epochs", "iterations")
    with pytest.raises(SettingError, match=r"^layers must name distinct modules, got \['a', 'a'\]"):
        _cfg(layers=["a", "a"])


@pytest.mark.parametrize(
    ("changes", "data_call"),
    [
        ({"per_class": 0}, lambda: stratified_indices([0, 1], per_class=0)),
        ({"fraction": 1.5}, lambda: stratified_indices([0, 1], fraction=1.5)),
        ({"per_class": 2, "fraction": 0.5}, lambda: check_sampling(2, 0.5)),
        ({"val_split": 1.0}, lambda: build_datasets("unused", image_size=8, val_split=1.0)),
        ({"image_size": 7}, lambda: train_transform(7)),
        ({"hflip": 1.5}, lambda: train_transform(8, hflip=1.5)),
        ({"crop_scale": 0.0}, lambda: train_transform(8, crop_scale=0.0)),
        (
            {"crop_scale": 0.5, "preset": "paper"},
            lambda: train_transform(8, "paper", crop_scale=0.5),
        ),
    ],
)
def test_config_and_data_share_each_check(changes: dict[str, Any], data_call: Any) -> None:
    """One check per setting: the config rejects a value with the data functions' message."""
    with pytest.raises(SettingError) as from_config:
        _cfg(**changes)
    with pytest.raises(SettingError) as from_data:
        data_call()
    assert str(from_config.value) == str(from_data.value)
    assert from_config.value.settings == from_data.value.settings
