"""Figures of a run: training curves, channel attention histograms and method comparisons.

matplotlib is the optional extra ``plots`` (``pip install deltaft[plots]``). It is imported inside
each function, and figures are drawn on a :class:`matplotlib.figure.Figure` with an explicit Agg
canvas, so pyplot's global state and the user's backend are never touched. Without matplotlib
every function logs one warning and returns ``None``.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from deltaft._utils import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from deltaft.attention import ChannelAttention

__all__ = [
    "new_figure",
    "plot_attention",
    "plot_compare",
    "plot_curves",
    "save_figure",
    "warn_no_matplotlib",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install the 'plots' extra (pip install 'deltaft[plots]') to get figures"
_SUBPLOT_SIZE = (4.2, 3.0)  # inches per subplot
_MAX_COLUMNS = 3
_LOG_SCALE_RATIO = 100.0  # a positive series spanning more than this gets a log y-axis
_SPLITS = ("train/", "val/", "test/")


def new_figure(n_panels: int, title: str = "") -> tuple[Figure, list[Axes]] | None:
    """A figure with an Agg canvas and ``n_panels`` axes, or ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    n_panels = max(n_panels, 1)
    columns = min(n_panels, _MAX_COLUMNS)
    rows = math.ceil(n_panels / columns)
    fig = Figure(
        figsize=(_SUBPLOT_SIZE[0] * columns, _SUBPLOT_SIZE[1] * rows + (0.4 if title else 0.0)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)  # attaches itself to fig: no pyplot, no backend switch
    grid = fig.subplots(rows, columns, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig, axes[:n_panels]


def warn_no_matplotlib(what: str) -> None:
    logger.warning("matplotlib is not installed: %s not written; %s.", what, _INSTALL_HINT)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at ``path`` with :func:`~deltaft._utils.atomic_write`."""
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _part_name(key: str) -> str:
    """The loss part of a metric key: ``train/reg/delta`` and ``val/reg/delta`` -> ``reg/delta``."""
    for split in _SPLITS:
        if key.startswith(split):
            return key[len(split) :]
    return key


def _series(
    metrics: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> dict[str, tuple[list[float], list[float]]]:
    """``{key: (epochs, values)}``, skipping epochs where a key is missing or not a finite number.

    The epoch is the record's ``epoch`` value when it has one, else its 1-based position.
    """
    series: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in keys}
    for index, record in enumerate(metrics):
        epoch = _number(record.get("epoch"))
        x = float(index + 1) if epoch is None else epoch
        for key in keys:
            value = _number(record.get(key))
            if value is not None:
                series[key][0].append(x)
                series[key][1].append(value)
    return {key: xy for key, xy in series.items() if xy[1]}


def _curve_panels(metrics: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Panel title -> metric keys: ``loss``, each other loss part (train and val together), then
    ``accuracy``."""
    keys: list[str] = []
    for record in metrics:
        for key, value in record.items():
            if key not in keys and _number(value) is not None:
                keys.append(key)
    panels: dict[str, list[str]] = {}
    for key in keys:
        if "loss" in key or "reg/" in key:
            panels.setdefault(_part_name(key), []).append(key)
    if "loss" in panels:  # the total first, then its parts in the order they were logged
        panels = {"loss": panels.pop("loss"), **panels}
    accuracy = [key for key in keys if "acc" in key]
    if accuracy:
        panels["accuracy"] = accuracy
    return panels


def _draw_placeholder(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_curves(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Training curves per epoch: one panel per loss part and one for accuracy, saved as PNG.

    Loss panels show every numeric key containing ``"loss"`` or ``"reg/"``, the ``train/`` and
    ``val/`` versions of a part together (``train/reg/delta`` and ``val/reg/delta`` share the
    panel ``reg/delta``); a panel whose positive values span more than a factor 100 gets a log
    y-axis. The accuracy panel shows every numeric key containing ``"acc"``. The x-axis is each
    record's ``epoch`` (its 1-based position when absent). Missing keys, ``None`` and non-finite
    values are skipped; with nothing to plot the figure says so.

    Args:
        metrics: one mapping per epoch, as in a run's ``metrics.jsonl``.
        path: where to write the PNG; parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, or ``None`` when matplotlib is not installed.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> path = plot_curves([{"epoch": 1, "train/loss": 1.2, "val/acc": 0.5}], folder / "c.png")
        >>> path in (folder / "c.png", None)  # None without matplotlib
        True
    """
    panels = _curve_panels(metrics)
    made = new_figure(len(panels), "training curves")
    if made is None:
        warn_no_matplotlib(f"training curves {path}")
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = made
    if not panels:
        _draw_placeholder(axes[0], "no loss or accuracy metrics recorded")
        return save_figure(fig, path)
    for ax, (title, keys) in zip(axes, panels.items(), strict=True):
        series = _series(metrics, keys)
        for key, (epochs, values) in series.items():
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
        values = [v for _, ys in series.values() for v in ys]
        if values and min(values) > 0 and max(values) > _LOG_SCALE_RATIO * min(values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_attention(
    attention: ChannelAttention | Mapping[str, Tensor], path: str | os.PathLike[str]
) -> Path | None:
    """Histogram of ``C * w[l, :]`` for every layer ``l``, one panel per layer, saved as PNG.

    Scaling by the channel count ``C`` puts uniform attention at exactly 1 (a dashed vertical line)
    whatever the layer's width: values above 1 are channels DELTA regularizes more than uniform.

    Args:
        attention: a :class:`~deltaft.attention.ChannelAttention` or ``{layer: w (C,)}``.
        path: where to write the PNG; parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, or ``None`` when matplotlib is not installed.
    """
    weights = attention if isinstance(attention, Mapping) else attention.weights
    made = new_figure(len(weights), "channel attention (C x w; uniform = 1)")
    if made is None:
        warn_no_matplotlib(f"attention histograms {path}")
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = made
    if not weights:
        _draw_placeholder(axes[0], "no layers")
        return save_figure(fig, path)
    for ax, (name, w) in zip(axes, weights.items(), strict=True):
        channels = w.numel()
        scaled = (w.detach().double().cpu().flatten() * channels).tolist()  # (C,)
        ax.hist(scaled, bins=min(50, max(10, channels // 4)), color="tab:blue", alpha=0.8)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(f"{name} (C = {channels})")
        ax.set_xlabel("C x w")
        ax.set_ylabel("channels")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_compare(
    results: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    ylabel: str = "accuracy (%)",
) -> Path | None:
    """Bar chart of the mean per method, with ± one standard deviation and every run as a point.

    The standard deviation is the sample one (``ddof=1``) when a method has more than one run,
    and no error bar is drawn for a single run (std 0). Non-finite values are dropped. Each tick
    label gives the method, mean ± std and the number of runs.

    Args:
        results: ``{method: [value of each seed]}``, in the order the bars are drawn.
        path: where to write the PNG; parent folders are created.
        title: the figure's title.
        ylabel: the y-axis label.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, or ``None`` when matplotlib is not installed.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "compare.png"
        >>> accuracies = {"l2": [90.1, 91.0, 90.5], "delta": [92.0, 92.4, 93.1]}
        >>> plot_compare(accuracies, path) in (path, None)  # None without matplotlib
        True
    """
    made = new_figure(1, title)
    if made is None:
        warn_no_matplotlib(f"comparison plot {path}")
        return None
    fig, (ax,) = made
    fig.set_size_inches(max(4.0, 1.4 * len(results) + 1.5), 3.8)
    if not results:
        _draw_placeholder(ax, "no results")
        return save_figure(fig, path)
    labels = []
    for i, (method, raw) in enumerate(results.items()):
        values = [v for v in (_number(r) for r in raw) if v is not None]
        if not values:
            labels.append(f"{method}\nno runs")
            continue
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        labels.append(f"{method}\n{mean:.2f} ± {std:.2f}\nn = {len(values)}")
        ax.bar(i, mean, width=0.6, color=f"C{i % 10}", alpha=0.6, yerr=std or None, capsize=6)
        offsets = (
            [0.0]
            if len(values) == 1
            else [-0.15 + 0.3 * k / (len(values) - 1) for k in range(len(values))]
        )
        ax.scatter([i + o for o in offsets], values, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(results)), labels)
    finite = [v for raw in results.values() for v in (_number(r) for r in raw) if v is not None]
    if finite:  # zoom on the data: bars from 0 would hide differences of a point or two
        low, high = min(finite), max(finite)
        margin = max(0.5, 0.25 * (high - low))
        ax.set_ylim(low - 2 * margin, high + margin)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
