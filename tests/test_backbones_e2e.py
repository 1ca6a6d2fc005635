"""``deltaft train --method delta`` end to end on vision transformers (issue #11).

The heavy tests run the four backbones the issue names at 224 px with random weights on the CPU
(minutes each: ``make test-all``); the fast one runs the same command on a 32 px timm ViT. Each
checks that the default layers are the residual stream (``blocks.N`` / ``encoder_layer_N`` /
Swin's stage ends), that their attention has one weight per channel (C-long, not per row or per
token), and that training and the test evaluation finish.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from torch import nn

from deltaft.attention import ChannelAttention
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    CLASSES,
    load_state,
    one_thread,
    restore_logging,
    run_main,
    write_images,
)

timm = pytest.importorskip("timm")


def tiny_vit(num_classes: int = 1000) -> nn.Module:
    """timm's ViT-Tiny recipe shrunk for tests: 32 px, patch 8 (16 tokens + class), width 24,
    depth 4, 3 heads."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=24,
        depth=4,
        num_heads=3,
        num_classes=num_classes,
    )


def _train_delta(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    image_size: int,
    threads: int = 1,
    extra: tuple[str, ...] = (),
) -> Path:
    """Train ``model`` with delta on 2 classes x 2 images, 2 steps of 2 images (the attention
    scored on one batch of 2); returns the run folder."""
    data, run = tmp_path / "data", tmp_path / "run"
    for split, count in (("train", 2), ("test", 1)):
        write_images(data, split, count, seed=count)
        for dropped in CLASSES[2:]:  # keep two classes
            shutil.rmtree(data / split / dropped)
    code, _, err = run_main(
        capsys, "train", "--data", str(data), "--model", model, "--weights", "none",
        "--image-size", str(image_size), "--method", "delta", "--per-class", "2",
        "--iterations", "2", "--batch-size", "2", "--attention-epochs", "1",
        "--attention-batches", "1", "--workers", "0", "--out", str(run), "--quiet",
        "--threads", str(threads), *extra,
    )  # fmt: skip
    assert code == 0, err
    return run


def _check_run(run: Path, layers: list[str], channels: list[int]) -> None:
    attention = ChannelAttention.load(run / "attention.safetensors")
    assert attention.layers == layers
    assert list(attention.channels.values()) == channels  # one weight per channel
    state = load_state(run / "checkpoints" / "last.pt")
    assert state["layers"] == layers and state["global_step"] == 2
    assert (run / "summary.json").is_file()


@pytest.mark.slow  # ~5 s of CPU, most of it the exact attention scores
def test_delta_on_a_tiny_timm_vit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _train_delta(tmp_path, capsys, "tests.test_backbones_e2e:tiny_vit", 32)
    _check_run(run, ["blocks.0", "blocks.1", "blocks.2", "blocks.3"], [24] * 4)


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("model", "layers", "channels"),
    [
        ("timm:vit_tiny_patch16_224", ["blocks.2", "blocks.5", "blocks.8", "blocks.11"], [192] * 4),
        (
            "timm:deit_tiny_patch16_224",
            ["blocks.2", "blocks.5", "blocks.8", "blocks.11"],
            [192] * 4,
        ),
        ("swin_t", ["features.1", "features.3", "features.5", "features.7"], [96, 192, 384, 768]),
        (
            "vit_b_16",
            [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)],
            [768] * 4,
        ),
    ],
)
def test_delta_on_transformers_at_224(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    layers: list[str],
    channels: list[int],
) -> None:
    """Exact attention scores, except on ViT-B/16: its 3072 channels cost about 1150 forwards
    of the network after the scored block (hours on 2 cores), so it is scored with ``taylor``
    here (tests/test_attention_tf.py compares exact with the loop on small timm ViTs and
    torchvision Swins, not on a torchvision ViT)."""
    extra = ("--attention-method", "taylor") if model == "vit_b_16" else ()
    run = _train_delta(tmp_path, capsys, model, 224, threads=os.cpu_count() or 1, extra=extra)
    _check_run(run, layers, channels)
