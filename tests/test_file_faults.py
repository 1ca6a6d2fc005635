"""Issue #12, classes 4, 8, 9 and 10: maps of one call, settings files and attention files.

Each test reproduced its defect before the fix: a shared module compared at two different calls,
a checkpoint that makes ``eval`` import code, YAML that expands without bound or hides a
duplicate key, an attention file estimated on other data accepted silently.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from deltaft import FeatureExtractor, TransferObjective, validate_layers
from deltaft.app import evaluate as evaluate_module
from deltaft.app.config import TrainConfig, load_config
from deltaft.app.config_io import MAX_YAML_NODES, coerce, normalise_keys, short_repr
from deltaft.app.errors import SettingError
from deltaft.app.evaluate import evaluate_checkpoint
from tests.cli_support import MODEL, load_state, run_main, write_images


# ------------------------------------------------------------------------------------------------
# Class 4: a module called more than once per forward
# ------------------------------------------------------------------------------------------------
class SharedReLU(nn.Module):
    """A ResNet-style block: one ``relu`` module called twice per forward, as torchvision does."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))  # (B, 4, H, W), relu called twice
        return self.fc(x.mean((2, 3)))


def test_validate_layers_refuses_a_module_called_twice() -> None:
    with pytest.raises(ValueError, match=r"Layer 'relu' of SharedReLU runs 2 times per forward"):
        validate_layers(SharedReLU(), ["relu"], input_size=8)
    assert validate_layers(SharedReLU(), ["conv2"], input_size=8) == {"conv2": (1, 4, 8, 8)}


def test_feature_extractor_refuses_a_second_call_of_one_module() -> None:
    net = SharedReLU()
    with FeatureExtractor(net, ["relu"]), pytest.raises(ValueError, match="runs more than once"):
        net(torch.randn(2, 3, 8, 8))
    with FeatureExtractor(net, ["conv1"]) as fx:  # one call per forward, popped each time
        for _ in range(2):
            net(torch.randn(2, 3, 8, 8))
            assert fx.pop()["conv1"].shape == (2, 4, 8, 8)


def test_objective_never_compares_two_calls_of_a_shared_module() -> None:
    """Before: the truncated source kept the first call, the target the last: fm > 0 at equal
    weights (90 for torchvision's ResNet-18 ``layer1.0.relu``)."""
    torch.manual_seed(0)
    model = SharedReLU()
    objective = TransferObjective(model, copy.deepcopy(model), method="fm", layers=["relu"])
    with pytest.raises(ValueError, match="'relu' runs more than once per forward"):
        objective(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    # A module called once: identical weights give a zero penalty.
    objective = TransferObjective(model, copy.deepcopy(model), method="fm", layers=["conv2"])
    model.eval()
    out = objective(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert float(out["reg/fm"].detach().sum()) == 0.0


# ------------------------------------------------------------------------------------------------
# Class 8: a checkpoint never makes eval import, call, download or write
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of the toy factory model (L2-SP: no attention to estimate)."""
    root = tmp_path_factory.mktemp("faults")
    for split, n, seed in (("train", 4, 0), ("val", 2, 1), ("test", 2, 2)):
        write_images(root / "data", split, n, seed)
    out = root / "run"
    argv = [
        "--threads", "1", "-q", "train", "--data", str(root / "data"), "--model", MODEL,
        "--weights", "none", "--method", "l2sp", "--out", str(out), "--image-size", "16",
        "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
    ]  # fmt: skip
    from deltaft.cli import main

    assert main(argv) == 0
    return out


def _tamper(run: Path, tmp_path: Path, **config: Any) -> Path:
    """A copy of ``run`` whose best.pt config holds ``config``."""
    import shutil

    copy_ = tmp_path / "tampered"
    shutil.copytree(run, copy_)
    path = copy_ / "checkpoints" / "best.pt"
    state = load_state(path)
    state["config"].update(config)
    torch.save(state, path)
    return copy_


def test_eval_never_imports_a_factory_named_by_the_checkpoint(
    toy_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = tmp_path / "imported"
    package = tmp_path / "site"
    package.mkdir()
    (package / "h3_planted.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef factory(num_classes=4):\n    raise SystemExit\n"
    )
    monkeypatch.syspath_prepend(str(package))
    run = _tamper(toy_run, tmp_path, model="h3_planted:factory")
    best = run / "checkpoints" / "best.pt"
    code, out, err = run_main(capsys, "-q", "eval", "--run", str(run), "--device", "cpu")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"deltaft: error: {best} names the model factory h3_planted:factory, which evaluating "
        "would import and call; a checkpoint never runs code by itself: pass --model "
        "h3_planted:factory if you trust that code."
    ]
    assert not marker.exists() and "h3_planted" not in sys.modules
    # os:system too: refused before anything is looked up.
    run = _tamper(toy_run, tmp_path / "b", model="os:system")
    with pytest.raises(SettingError, match="names the model factory os:system"):
        evaluate_checkpoint(run, device="cpu")


def test_eval_runs_a_factory_the_user_names(
    toy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(capsys, "-q", "eval", "--run", str(toy_run), "--model", MODEL)
    assert code == 0, err
    assert out.startswith("test accuracy ")
    code, _, err = run_main(
        capsys, "-q", "eval", "--run", str(toy_run), "--model", "tests.toy_models:other_cnn"
    )
    assert code == 2
    assert f"was trained with model {MODEL}, not tests.toy_models:other_cnn; pass --model" in err


def test_resume_never_imports_a_factory_named_by_the_run_folder(
    toy_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``train --resume --out RUN`` reads RUN/config.yaml; its model must not run code."""
    import shutil

    import yaml

    marker = tmp_path / "imported"
    package = tmp_path / "site"
    package.mkdir()
    (package / "h3_planted_resume.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(package))
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored.update(model="h3_planted_resume:factory", download=True)
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    for name in ("last", "best"):  # tampered consistently: resume's own check sees no change
        state = load_state(run / "checkpoints" / f"{name}.pt")
        state["config"].update(model="h3_planted_resume:factory", download=True)
        torch.save(state, run / "checkpoints" / f"{name}.pt")
    code, out, err = run_main(capsys, "-q", "train", "--resume", "--out", str(run))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"deltaft: error: {run / 'config.yaml'} names the model factory "
        "h3_planted_resume:factory, which would be imported and called; a run folder never "
        "runs code by itself: pass --model h3_planted_resume:factory if you trust that code."
    ]
    assert not marker.exists() and "h3_planted_resume" not in sys.modules


def test_eval_never_downloads_for_a_checkpoint(
    toy_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored ``download: true`` (a runtime setting) does not reach the data."""
    seen: dict[str, Any] = {}

    def build_data(cfg: Any, *args: Any) -> Any:
        seen["download"] = cfg.download
        raise KeyboardInterrupt  # stop here: only the settings matter

    monkeypatch.setattr(evaluate_module, "build_data", build_data)
    run = _tamper(toy_run, tmp_path, download=True)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(run, device="cpu", model=MODEL)
    assert seen == {"download": False}


# ------------------------------------------------------------------------------------------------
# Class 9: YAML settings files
# ------------------------------------------------------------------------------------------------
def _nested_aliases(levels: int) -> str:
    """``levels`` lists of nine aliases of the previous list: 9 ** (levels + 1) items expanded."""
    lines = ["layers:", ' - &l0 ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, levels):
        lines.append(f" - &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_aliases_that_expand_too_far_are_refused(tmp_path: Path) -> None:
    """Before: this 294-byte file took 31 s and 1.6 GB to refuse, in a 254 MB message."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_nested_aliases(8))
    assert len(path.read_bytes()) < 400
    with pytest.raises(ValueError, match=rf"expand to more than {MAX_YAML_NODES} values") as info:
        load_config(path)
    assert len(str(info.value)) < 300
    path.write_text("layers: &a [conv1, *a]\n")
    with pytest.raises(ValueError, match="refers to its own anchor"):
        load_config(path)
    path.write_text("layers: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_config(path)
    # A few aliases, as people use them, are fine; merge keys may be overridden.
    path.write_text("layers: &l [a, b]\nbatch_size: 8\n")
    assert load_config(path) == {"layers": ["a", "b"], "batch_size": 8}


def test_yaml_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """Before: the second ``lr`` silently won."""
    path = tmp_path / "twice.yaml"
    path.write_text("lr: 0.1\nalpha: 0.01\nlr: 0.001\n")
    with pytest.raises(
        ValueError,
        match=r"line 3, column 1: duplicate key 'lr' \(first on line 1\); keep one of them\.",
    ):
        load_config(path)
    path.write_text("{lr: 0.1, lr: 0.2}\n")
    with pytest.raises(ValueError, match="duplicate key 'lr'"):
        load_config(path)
    path.write_text("base: &b {x: 1, y: 2}\nother: {<<: *b, y: 3}\n")
    from deltaft.app.config_io import read_settings_file

    assert read_settings_file(path)["other"] == {"x": 1, "y": 3}


def test_user_values_are_cut_short_in_messages() -> None:
    huge = ["x" * 1000] * 100_000
    with pytest.raises(SettingError) as info:
        coerce("lr", huge, float)
    assert len(str(info.value)) < 150 and str(info.value).endswith("....")
    with pytest.raises(ValueError) as error:
        normalise_keys({"k" * 1000: 1, **{f"u{i}": i for i in range(50)}}, ["lr"], "a file")
    assert len(str(error.value)) < 600 and "and 46 more" in str(error.value)
    assert "..." in short_repr("a" * 500) and len(short_repr("a" * 500)) <= 80
    with pytest.raises(SettingError) as info:
        TrainConfig.from_sources({"method": "{x}" * 1000}, {"data": "d", "model": "m"})
    assert len(str(info.value)) < 300


# ------------------------------------------------------------------------------------------------
# Class 10: an attention file says which model and data it came from, and is checked
# ------------------------------------------------------------------------------------------------
def _exact_attention(**fields: Any) -> Any:
    from deltaft.attention import ChannelAttention, attention_from_scores

    scores = {"0": torch.tensor([0.1, 0.3, 0.2])}
    values = {
        "weights": attention_from_scores(scores),
        "scores": scores,
        "temperature": 5.0,
        "n_batches": 2,
        "model_fingerprint": "0123456789abcdef",
        "data_fingerprint": "fedcba9876543210",
        "method": "exact",
        **fields,
    }
    return ChannelAttention(**values)


def _resave(path: Path, **metadata: str) -> None:
    """Rewrite ``path`` with some metadata fields replaced, as a hand edit would."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        stored = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**stored, **metadata})


def test_attention_file_without_fingerprints_is_not_taken_for_uniform(tmp_path: Path) -> None:
    """Before: an ``exact`` file with empty fingerprints skipped the model check, as uniform."""
    from deltaft.attention import ChannelAttention

    path = tmp_path / "a.safetensors"
    _exact_attention().save(path)
    _resave(path, model_fingerprint='""', data_fingerprint='""')
    with pytest.raises(ValueError, match="'exact' attention has no model or data fingerprint"):
        ChannelAttention.load(path, model=nn.Sequential(nn.Conv2d(3, 3, 1)))
    ChannelAttention.uniform({"0": 3}).save(path)
    _resave(path, method='"exact"', n_batches="2")
    with pytest.raises(ValueError, match="has no model or data fingerprint"):
        ChannelAttention.load(path)
    _exact_attention().save(path)
    _resave(path, method='"uniform"', model_fingerprint='""', data_fingerprint='""')
    with pytest.raises(ValueError, match=r"says it is uniform, but layers \['0'\]"):
        ChannelAttention.load(path)
    with pytest.raises(ValueError, match="no model or data fingerprint"):
        _exact_attention(data_fingerprint="").save(path)
    ChannelAttention.uniform({"0": 3}).save(path)  # uniform files need none
    assert ChannelAttention.load(path).method == "uniform"


def test_attention_file_from_other_training_data_is_refused(
    toy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``train --attention`` took a file estimated on other data without a word."""
    import shutil

    data = toy_run.parent / "data"
    other = tmp_path / "other"
    shutil.copytree(data, other)
    write_images(other, "train", 5, seed=7)  # one more image per class, the others rewritten
    attention = tmp_path / "att.safetensors"
    common = [
        "--model", MODEL, "--weights", "none", "--image-size", "16", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--attention-epochs", "1",
        "--attention-batches", "1",
    ]  # fmt: skip
    code, _, err = run_main(
        capsys, "-q", "--threads", "1", "attention", "--data", str(data), *common,
        "--out", str(attention),
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_main(
        capsys, "-q", "--threads", "1", "train", "--data", str(other), *common,
        "--attention", str(attention), "--out", str(tmp_path / "run"), "--epochs", "1",
    )  # fmt: skip
    assert (code, out) == (2, "")
    [line] = err.splitlines()
    assert line.startswith(f"deltaft: error: --attention {attention} was estimated with training ")
    assert "re-run `deltaft attention` with this run's data settings" in line


def test_training_fingerprint_follows_the_images(tmp_path: Path) -> None:
    from deltaft.app.attention import training_fingerprint
    from deltaft.app.data.folders import ImageFolder

    write_images(tmp_path / "a", "train", 2, seed=0)
    first = training_fingerprint(ImageFolder(tmp_path / "a" / "train"))
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert training_fingerprint(ImageFolder(tmp_path / "moved" / "train")) == first
    write_images(tmp_path / "moved", "train", 3, seed=0)
    assert training_fingerprint(ImageFolder(tmp_path / "moved" / "train")) != first
