"""Hugging Face models (``--model hf:NAME_OR_PATH``), offline: tiny ViT and ResNet built from
configs with random weights and saved with ``save_pretrained``; and modules that return tuples
(transformers 4 blocks return ``(hidden_states, ...)``): the map is the first element."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.testing import assert_close

from deltaft.attention import channel_removal_scores
from deltaft.hooks import FeatureExtractor
from deltaft.layers import default_layers, detect_layouts
from deltaft.layouts import declared_prefix_tokens
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    one_thread,
    restore_logging,
    run_main,
    write_images,
)
from tests.reference import ref_removal_scores_last_axis

SKIP = "transformers is not installed (pip install 'deltaft[hf]'); the hf: tests need it"


def _transformers() -> Any:
    return pytest.importorskip("transformers", reason=SKIP)


def _tiny_vit(transformers: Any) -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def _tiny_resnet(transformers: Any) -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(config)


def _tiny_swin(transformers: Any, version: str = "") -> nn.Module:
    config = getattr(transformers, f"Swin{version}Config")(
        image_size=32, patch_size=4, embed_dim=8, depths=[2, 1, 1], num_heads=[1, 1, 1],
        window_size=2, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"Swin{version}ForImageClassification")(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    transformers = _transformers()
    root = tmp_path_factory.mktemp("hf")
    _tiny_vit(transformers).save_pretrained(root / "vit")
    _tiny_resnet(transformers).save_pretrained(root / "resnet")
    processor = {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3,
                 "image_std": [0.25] * 3}  # fmt: skip
    (root / "resnet" / "preprocessor_config.json").write_text(json.dumps(processor))
    write_images(root / "data", "train", 4, seed=0)
    write_images(root / "data", "test", 2, seed=1)
    return {"vit": root / "vit", "resnet": root / "resnet", "data": root / "data"}


def test_build_model_reads_hf_folders(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from deltaft.app.models import build_model

    with caplog.at_level(logging.INFO, logger="deltaft"):
        vit, info = build_model(f"hf:{folders['vit']}")
    assert (info.head, info.input_size, info.mean) == ("classifier", 32, (0.485, 0.456, 0.406))
    assert "no image processor settings here; input 32" in caplog.text
    saved = load_file(folders["vit"] / "model.safetensors")
    assert torch.equal(vit.state_dict()["classifier.weight"], saved["classifier.weight"])
    fresh, info = build_model(f"hf:{folders['resnet']}", weights="none", num_classes=3)
    assert (info.head, info.input_size, info.mean, info.std) == (
        "classifier.1", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    )  # fmt: skip
    logits = fresh.eval()(torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 3)
    assert declared_prefix_tokens(vit) == 1 and declared_prefix_tokens(fresh) is None


def test_default_layers_and_layouts_of_hf_models(folders: dict[str, Path]) -> None:
    transformers = _transformers()
    vit, resnet = _tiny_vit(transformers), _tiny_resnet(transformers)
    blocks = default_layers(vit, input_size=32)
    assert [b.rsplit(".", 1)[1] for b in blocks] == ["0", "1"]  # 2 blocks: both
    assert blocks[0] in ("vit.layers.0", "vit.encoder.layer.0")  # transformers 5 / 4
    # a fixed-size model: its config's hidden_size declares the tokens' channel axis
    assert detect_layouts(vit, blocks, input_size=32) == dict.fromkeys(blocks, "BNC")
    stages = ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]
    assert default_layers(resnet, input_size=32) == stages
    assert detect_layouts(resnet, stages, input_size=32) == dict.fromkeys(stages, "BCHW")


@pytest.mark.parametrize("version", ["", "v2"])
def test_default_layers_of_hf_swin_are_its_stage_ends_before_patch_merging(version: str) -> None:
    """As torchvision's Swin features.1 .3 .5 .7: each stage's last block, tokens (B, N, C)."""
    swin = _tiny_swin(_transformers(), version)
    prefix = f"swin{version}.encoder.layers"
    ends = [f"{prefix}.0.blocks.1", f"{prefix}.1.blocks.0", f"{prefix}.2.blocks.0"]
    assert default_layers(swin, input_size=32) == ends
    assert detect_layouts(swin, ends, input_size=32) == dict.fromkeys(ends, "BNC")
    with FeatureExtractor(swin.eval(), ends) as fx:
        swin(torch.randn(1, 3, 32, 32))
        feats = fx.pop()
    assert [tuple(feats[n].shape) for n in ends] == [(1, 64, 8), (1, 16, 16), (1, 4, 32)]


@pytest.mark.parametrize(("family", "channels"), [("vit", (32, 32)), ("swin", (8, 16, 32))])
def test_exact_attention_equals_the_reference_on_hf_models(
    family: str, channels: tuple[int, ...]
) -> None:
    build = {"vit": _tiny_vit, "swin": _tiny_swin}[family]
    model = build(_transformers()).double().eval()
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64), torch.tensor([0, 4, 2]))
        for _ in range(2)
    ]
    layers = default_layers(model, input_size=32)
    got = channel_removal_scores(model, batches, layers, n_batches=2, chunk_size=8)
    want = ref_removal_scores_last_axis(_Logits(model), batches, [f"m.{n}" for n in layers])
    for name, count in zip(layers, channels, strict=True):
        assert got[name].shape == (count,)
        assert_close(got[name], want[f"m.{name}"], rtol=1e-9, atol=1e-12)


class _Logits(nn.Module):
    """The HF model's ``.logits``, for the reference loop (which takes a plain tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x).logits  # type: ignore[no-any-return]


@pytest.mark.slow  # trains / estimates several runs: seconds each
def test_train_and_attention_on_hf_models_through_the_command_line(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "--data", str(folders["data"]), "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--attention-epochs", "1", "--attention-batches", "1",
    ]  # fmt: skip
    code, out, err = run_main(
        capsys, "train", *common, "--model", f"hf:{folders['vit']}", "--method", "delta",
        "--out", str(tmp_path / "vit"),
    )  # fmt: skip
    assert code == 0, err
    assert "test accuracy" in out
    weights = load_file(tmp_path / "vit" / "attention.safetensors")
    assert sorted(k for k in weights if k.startswith("weights")) == [
        f"weights/{b}" for b in default_layers(_tiny_vit(_transformers()), input_size=32)
    ]
    assert all(v.shape == (32,) for k, v in weights.items() if k.startswith("weights"))
    code, _, err = run_main(
        capsys, "train", *common, "--model", f"hf:{folders['resnet']}", "--weights", "none",
        "--method", "delta", "--out", str(tmp_path / "resnet"),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "resnet" / "summary.json").read_text())
    assert summary["test_accuracy"] is not None


def test_hf_errors_are_one_line(
    folders: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _transformers()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries here
    common = ["--data", str(folders["data"]), "--device", "cpu", "--workers", "0"]
    cases = [
        ("hf:google/vit-base-patch16-224", "imagenet",
         r"could not load the Hugging Face weights of hf:google/vit-base-patch16-224: a hub "
         r"name needs the network .* pass the local folder that save_pretrained wrote"),
        ("hf:google/vit-base-patch16-224", "none", r"Hugging Face config of hf:google"),
        (f"hf:{tmp_path / 'missing'}", "imagenet", r"--model hf:.*missing: no such folder"),
    ]  # fmt: skip
    for model, weights, match in cases:
        code, _, err = run_main(
            capsys, "train", *common, "--model", model, "--weights", weights,
            "--out", str(tmp_path / "out"),
        )  # fmt: skip
        last = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err, err
        assert last.startswith("deltaft: error: ") and __import__("re").search(match, last), last


# --- modules that return tuples (transformers 4 blocks) ------------------------------------------
class _TupleBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + self.fc(self.norm(x)).tanh(), x.sum()  # (hidden_states, something else)


class TupleToy(nn.Module):
    """Token blocks that return (hidden_states, extra), as transformers 4 layers do."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.embed_dim = dim
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.layer = nn.ModuleList([_TupleBlock(dim) for _ in range(2)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for block in self.layer:
            h = block(h)[0]
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("method", ["exact", "reference", "taylor"])
def test_tuple_outputs_are_read_by_their_first_element(method: str) -> None:
    torch.manual_seed(0)
    model = TupleToy().double().eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    with FeatureExtractor(model, ["layer.0", "layer.1"]) as fx:
        model(x)
        maps = fx.pop()
    assert [tuple(m.shape) for m in maps.values()] == [(4, 4, 6), (4, 4, 6)]
    assert detect_layouts(model, ["layer.0"], input_size=8) == {"layer.0": "BNC"}
    got = channel_removal_scores(model, [(x, y)], ["layer.0"], n_batches=1, method=method)  # type: ignore[arg-type]
    if method == "taylor":
        assert got["layer.0"].shape == (6,) and bool(torch.isfinite(got["layer.0"]).all())
        return
    want = ref_removal_scores_last_axis(_FirstOf(model), [(x, y)], ["layer.0"])
    assert_close(got["layer.0"], want["layer.0"], rtol=1e-9, atol=1e-12)


class _FirstOf(nn.Module):
    """``model`` whose tuple blocks hand the reference loop their map (it zeroes ``out[..., j]``
    of a tensor): each block is wrapped to return its first element, the rest of the model
    unchanged."""

    def __init__(self, model: TupleToy) -> None:
        super().__init__()
        self.inner = model
        self.layer = nn.ModuleList([_First(b) for b in model.layer])

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner.patch(x).flatten(2).transpose(1, 2)
        for block in self.layer:
            h = block(h)
        return self.inner.head(h.mean(dim=1))


class _First(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)[0]  # type: ignore[no-any-return]
