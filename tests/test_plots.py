from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from deltaft.app.plots import plot_attention, plot_compare, plot_curves

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS = [
    {
        "epoch": 1,
        "train/loss": 2.0,
        "train/task_loss": 1.5,
        "train/reg/delta": 0.4,
        "train/reg/head": 0.1,
        "train/acc": 0.40,
        "val/loss": 1.8,
        "val/acc": 0.45,
        "lr": 0.01,
        "seconds": 3.0,
    },
    {
        "epoch": 2,
        "train/loss": 1.2,
        "train/task_loss": 0.9,
        "train/reg/delta": 0.25,
        "train/reg/head": 0.05,
        "train/acc": 0.70,
        "val/loss": 1.1,
        "val/acc": 0.66,
        "lr": 0.001,
        "seconds": 2.9,
    },
]


def _assert_png(path: Path | None) -> None:
    assert path is not None
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # no temporary file left behind


def _attention() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layer1": torch.softmax(torch.randn(16, generator=gen), 0),
        "layer2": torch.softmax(torch.randn(64, generator=gen) / 5, 0),
        "layer3": torch.full((8,), 1 / 8),
    }


def test_plot_curves_writes_png(tmp_path: Path) -> None:
    path = plot_curves(METRICS, tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    _assert_png(path)


@pytest.mark.parametrize(
    "metrics",
    [
        [],
        [{}],
        [{"lr": 0.1, "seconds": 1.0}],  # nothing to plot
        [{"train/loss": 1.0}, {"val/acc": 0.5}],  # keys that come and go
        [{"train/loss": None, "train/acc": float("nan"), "note": "text", "flag": True}],
        [{"epoch": 1, "train/loss": 1e-6}, {"epoch": 2, "train/loss": 1e3}],  # log scale
    ],
)
def test_plot_curves_is_robust_to_missing_keys(tmp_path: Path, metrics: list[dict]) -> None:  # type: ignore[type-arg]
    _assert_png(plot_curves(metrics, tmp_path / "curves.png"))


def test_curve_panels_group_train_and_val_by_part() -> None:
    from deltaft.app.plots import _curve_panels

    panels = _curve_panels(METRICS)
    assert panels == {
        "loss": ["train/loss", "val/loss"],
        "task_loss": ["train/task_loss"],
        "reg/delta": ["train/reg/delta"],
        "reg/head": ["train/reg/head"],
        "accuracy": ["train/acc", "val/acc"],
    }


def test_plot_attention_accepts_mapping_and_channel_attention(tmp_path: Path) -> None:
    from deltaft.attention import ChannelAttention

    weights = _attention()
    _assert_png(plot_attention(weights, tmp_path / "mapping.png"))
    attention = ChannelAttention.uniform({"a": 4, "b": 32})
    _assert_png(plot_attention(attention, tmp_path / "attention.png"))
    _assert_png(plot_attention({}, tmp_path / "empty.png"))


def test_plot_compare_writes_png(tmp_path: Path) -> None:
    results = {"l2": [90.1, 91.0, 90.5], "l2sp": [91.5], "delta": [92.0, 92.4, 93.1], "fm": []}
    _assert_png(plot_compare(results, tmp_path / "compare.png", title="MNIST, 3 seeds"))
    _assert_png(plot_compare({}, tmp_path / "empty.png"))
    _assert_png(plot_compare({"l2": [float("nan"), 50.0]}, tmp_path / "nan.png"))


def test_plots_do_not_touch_pyplot_state(tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    plot_compare({"l2": [1.0, 2.0]}, tmp_path / "compare.png")
    plot_curves(METRICS, tmp_path / "curves.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:  # pyplot may be imported by another test
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


@pytest.mark.parametrize(
    ("plot", "args"),
    [
        (plot_curves, (METRICS,)),
        (plot_attention, (_attention(),)),
        (plot_compare, ({"l2": [1.0, 2.0]},)),
    ],
)
def test_missing_matplotlib_warns_and_returns_none(
    plot, args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # A None entry in sys.modules makes `import` raise ImportError, as if it were not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.WARNING, logger="deltaft.app.plots"):
        assert plot(*args, tmp_path / "figure.png") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "matplotlib is not installed" in warnings[0].getMessage()
    assert "deltaft[plots]" in warnings[0].getMessage()
    assert not (tmp_path / "figure.png").exists()
