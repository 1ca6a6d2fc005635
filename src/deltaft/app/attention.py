"""``deltaft attention`` as a function, and the attention steps that ``deltaft train`` shares:
estimating the channel attention reproducibly from the settings, and loading a file checked
against the source model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from deltaft.app.build import (
    build_run,
    derived_seed,
    make_loader,
    resolve_device,
    seed_everything,
    select_layers_and_layouts,
    select_prefix_tokens,
)
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError, literal
from deltaft.attention import ChannelAttention, estimate_channel_attention
from deltaft.layers import Layout

__all__ = ["estimate_attention", "load_attention", "run_attention", "training_fingerprint"]

logger = logging.getLogger(__name__)


def training_fingerprint(train: Dataset[Any]) -> str:
    """Content hash of a training split: 16 hex digits of a SHA-256.

    For a folder of images (a dataset with ``root`` and ``samples``): the class names and, per
    image in order, its path under ``root``, its label and its size in bytes, so a renamed,
    added, removed, relabelled or rewritten image changes it while moving the folder does not.
    For another dataset (``tv:NAME``): its type, class names and length. The images are not
    read, so it costs one ``stat`` per file.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([str(c) for c in getattr(train, "classes", [])]).encode() + b"\0")
    samples, root = getattr(train, "samples", None), getattr(train, "root", None)
    if isinstance(samples, list) and root is not None:
        for path, label in samples:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            digest.update(f"{os.path.relpath(path, root)}\0{label}\0{size}\n".encode())
    else:
        digest.update(f"{type(train).__name__}\0{len(train)}".encode())  # type: ignore[arg-type]
    return digest.hexdigest()[:16]


def load_attention(
    path: str | Path,
    source: nn.Module,
    layers: Sequence[str] | None,
    *,
    setting: Literal["attention", "resume"],
    train: Dataset[Any] | None = None,
) -> ChannelAttention:
    """Read an attention file; check it against the source model (and ``layers`` when given).

    With ``train``, an estimated (non-uniform) attention must have been estimated on this
    training split: its :func:`training_fingerprint` is stored in the file by
    :func:`estimate_attention` and compared; a file estimated on other data, or one that does
    not say (made by the library's ``estimate_channel_attention``), is refused, since its
    weights rank the channels for another task. There is no override: re-run
    ``deltaft attention`` with the training settings.

    Raises:
        SettingError: no such file, or a file for another model, other layers or other data;
            the message names ``setting``, the setting that gave the path.
    """
    try:
        attention = ChannelAttention.load(path, model=source)
        if layers is not None:
            attention.check_compatible(layers)
    except FileNotFoundError:
        raise SettingError(f"{{{setting}}} {literal(path)}: no such file.") from None
    except ValueError as error:
        raise SettingError(f"{{{setting}}} {literal(path)}: {literal(error)}") from None
    if train is not None and attention.method != "uniform":
        want = training_fingerprint(train)
        got = attention.dataset_fingerprint
        if got != want:
            what = f"training data {literal(got)}" if got else "no record of its training data"
            raise SettingError(
                f"{{{setting}}} {literal(path)} was estimated with {what}, but this run's "
                f"training split is {want} (other images, labels or subsample); re-run "
                "`deltaft attention` with this run's data settings, or leave out "
                f"{{{setting}}} to estimate it."
            )
    return attention


def estimate_attention(
    cfg: TrainConfig,
    source: nn.Module,
    train: Dataset[Any],
    layers: Sequence[str],
    num_classes: int,
    head: str,
    device: torch.device,
    *,
    progress: bool = False,
    layouts: Mapping[str, Layout] | None = None,
    prefix_tokens: int = 0,
    on_probe: Callable[[nn.Module], None] | None = None,
) -> ChannelAttention:
    """Estimate the channel attention on the training split, reproducibly from ``cfg.seed``
    (the RNGs are seeded from ``(seed, "attention")``, the data order from
    ``(seed, "attention-data")``); ``progress`` shows a bar while the channels are scored.
    The result records the :func:`training_fingerprint` of ``train``. ``layouts``: the layers'
    layouts as the run decided them (:func:`~deltaft.app.build.select_layers_and_layouts`);
    ``None`` detects them. ``prefix_tokens``: leading tokens of ``(B, N, C)`` maps not scored
    (:func:`~deltaft.app.build.select_prefix_tokens`).
    The result records the :func:`training_fingerprint` of ``train``. ``on_probe`` is called
    with the source and its trained attention head before the channels are scored (see
    :func:`~deltaft.attention.estimate_channel_attention`).

    Raises:
        ValueError: estimation failed; the message starts with ``attention estimation:``.
    """
    seed_everything(derived_seed(cfg.seed, "attention"))
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "attention-data"))
    loader = make_loader(train, cfg, device, shuffle=True, generator=generator)
    start = time.perf_counter()
    try:
        attention = estimate_channel_attention(
            source,
            loader,
            layers,
            num_classes,
            epochs=cfg.attention_epochs,
            bn=cfg.bn,
            n_batches=cfg.attention_batches,
            temperature=cfg.temperature,
            method=cfg.attention_method,
            head=head,
            device=device,
            progress=progress,
            layouts=layouts,
            prefix_tokens=prefix_tokens,
            on_probe=on_probe,
        )
    except ValueError as error:
        raise ValueError(f"attention estimation: {error}") from None
    attention = dataclasses.replace(attention, dataset_fingerprint=training_fingerprint(train))
    logger.info(
        "attention: %d layers, %d channels in %.1f s",
        len(attention.layers),
        sum(attention.channels.values()),
        time.perf_counter() - start,
    )
    return attention


def run_attention(
    cfg: TrainConfig, path: str | Path, *, progress: bool = False
) -> ChannelAttention:
    """Estimate the channel attention of ``cfg.model`` on ``cfg.data`` and save it to ``path``.

    Uses ``cfg``'s data, model, layers (default rule when ``None``), batch size, seed and the
    ``attention_*``, ``temperature`` and ``bn`` settings; the result is identical to the one
    ``deltaft train`` with the same settings estimates, so the file can be reused with
    ``attention``. ``progress`` shows a bar (tqdm, on stderr) while the channels are scored.

    Raises:
        SettingError: ``path`` exists already (nothing is overwritten), or a bad setting.
        ValueError: invalid data, model or layers (as :func:`deltaft.app.train.run_training`).
    """
    path = Path(path)
    if path.exists():
        raise SettingError(f"{path} exists; choose a new {{out}} file (nothing is overwritten).")
    built = build_run(cfg, resolve_device(cfg.device), test=False)  # attention never reads it
    layers, layouts = select_layers_and_layouts(
        cfg.layers, built.model, built.image_size, cfg.layout
    )
    attention = estimate_attention(
        cfg,
        built.source,
        built.splits.train,
        layers,
        len(built.classes),
        built.head,
        built.device,
        progress=progress,
        layouts=layouts,
        prefix_tokens=select_prefix_tokens(cfg.exclude_prefix_tokens, built.source, layouts),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    attention.save(path)
    return attention
