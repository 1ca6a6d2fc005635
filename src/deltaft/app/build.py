"""The build step that ``train``, ``attention`` and ``eval`` share: seeds, device, source model,
data (decoded once and checked), the target copy with its new head, layers and loaders.

Unlike the core library these functions change global state on purpose, as a training script
does: :func:`build_run` seeds Python, NumPy and torch from ``cfg.seed``, so that every operation
that builds from the same settings builds the same thing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from deltaft.app.backbone_checks import check_input_size, head_as_setting
from deltaft.app.checks import layout_setting
from deltaft.app.config import TrainConfig
from deltaft.app.data import DataSplits, SampleSeeds, SeededDataset, build_datasets
from deltaft.app.distributed import DistInfo
from deltaft.app.errors import SettingError, literal
from deltaft.app.models import ModelInfo, build_model
from deltaft.heads import replace_head
from deltaft.layers import Layout, check_layers, default_layers, validate_layers
from deltaft.layouts import declared_prefix_tokens

__all__ = [
    "BuiltRun",
    "build_data",
    "build_run",
    "derived_seed",
    "make_loader",
    "require_validation",
    "resolve_device",
    "seed_everything",
    "select_layers",
    "select_layers_and_layouts",
    "select_prefix_tokens",
    "verify_data",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Seeds and devices
# ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG (with ``seed mod 2**32``) and torch (every
    device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, "epoch", 3, rank)``), stable across runs:
    the first 8 bytes of ``sha256(repr(parts))`` as a little-endian integer, shifted right by 1.

    Example:
        >>> seed = derived_seed(0, "epoch", 1)
        >>> seed == derived_seed(0, "epoch", 1) != derived_seed(0, "epoch", 2), seed < 2**63
        (True, True)
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under ``torchrun``, ``cuda`` is
    ``cuda:LOCAL_RANK``.

    Raises:
        SettingError: CUDA (or MPS) requested but not available.
    """
    local_rank = info.local_rank if info is not None and info.enabled else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(
                f"{{device}} {name}: CUDA is not available here; use {{device}} cpu."
            )
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else 0)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError("{device} mps: MPS is not available here; use {device} cpu.")
    return device


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def build_data(
    cfg: TrainConfig, info: ModelInfo | None = None, image_size: int | None = None
) -> DataSplits:
    """The splits of ``cfg.data`` with ``cfg``'s transforms, normalised with ``info``'s mean/std
    (without ``info``, only to list the splits: ImageNet's, at ``cfg.image_size`` or 224)."""
    norm = {} if info is None else {"mean": info.mean, "std": info.std}
    return build_datasets(
        cfg.data,
        image_size=image_size or cfg.image_size or 224,
        preset=cfg.preset,
        hflip=cfg.hflip,
        crop_scale=cfg.crop_scale,
        **norm,
        per_class=cfg.per_class,
        fraction=cfg.fraction,
        val_split=cfg.val_split,
        seed=cfg.seed,
        download=cfg.download,
        data_root=cfg.data_root,
    )


def require_validation(cfg: TrainConfig, why: str, splits: DataSplits | None = None) -> None:
    """Refuse data without a validation split, before any work, for a run that scores on it
    (``why`` says what does, e.g. "tuning scores every trial on the validation split").

    With ``splits`` (already built) they are checked; otherwise a held-out ``val_split`` or an
    image folder's ``val/`` is enough, and a ``tv:`` dataset's splits are listed (no image
    decoded).

    Raises:
        SettingError: there is no validation split; the message says how to add one.
    """
    if splits is None and cfg.val_split == 0 and cfg.data.startswith("tv:"):
        splits = build_data(cfg)
    if splits is not None:
        missing = splits.val is None
    else:
        missing = cfg.val_split == 0 and not (Path(cfg.data) / "val").is_dir()
    if missing:
        raise SettingError(
            f"{why} (never on test), but {{data}} {literal(cfg.data)} has no validation split; "
            "set {val_split} (e.g. 0.2) or add a val/ folder."
        )


def verify_data(splits: DataSplits) -> list[str]:
    """Decode every image once, take the unreadable files out of every split and check that each
    split still has an image of every class.

    Training, validation and test then use only images that decoded at start-up, and the splits'
    lengths count them. A training file that fails later is replaced by the next readable one
    (with a warning); a validation or test file that fails later stops the evaluation with an
    ``OSError`` naming it (:class:`~deltaft.app.data.ImageFolder` ``skip_unreadable``).

    Returns:
        The sorted paths of the unreadable files (each was named in a warning).

    Raises:
        ValueError: a class has no readable image in the training, validation or test split.
    """
    skipped = splits.verify()
    if skipped:  # each was named in a warning as it was found
        logger.info(
            "%d unreadable image(s) left out of the splits; summary.json lists them.", len(skipped)
        )
    return skipped


def make_loader(
    dataset: Dataset[Any],
    cfg: TrainConfig,
    device: torch.device,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    sampler: Sampler[Any] | None = None,
    drop_last: bool | None = None,
) -> DataLoader[Any]:
    """A loader with ``cfg``'s batch size and workers (pinned memory on CUDA).

    ``drop_last=None`` drops a final batch of one image from a shuffled loader (the attention
    head trains with BatchNorm in train mode, as training does, where one image is no batch
    statistic) and keeps every image of an unshuffled (evaluation) loader.

    With a ``generator`` (training, attention estimation), the data order comes from it and
    each image's random augmentation from ``(generator.initial_seed(), pass, index)``
    (:class:`~deltaft.app.data.SampleSeeds`): the same with any number of workers, and the
    main process's RNG is left as it was.
    """
    if drop_last is None:
        size = len(dataset)  # type: ignore[arg-type]
        drop_last = shuffle and size > cfg.batch_size and size % cfg.batch_size == 1
    if generator is not None:
        if sampler is None:  # the sampler DataLoader would make, drawing from the same generator
            sized: Any = dataset
            sampler = (
                RandomSampler(sized, generator=generator) if shuffle else SequentialSampler(sized)
            )
        sampler = SampleSeeds(sampler, generator)
        dataset = SeededDataset(dataset)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def select_layers(names: Sequence[str] | None, model: nn.Module, image_size: int) -> list[str]:
    """``names``, or the default layers of ``model`` when ``None``, checked against ``model``.

    Raises:
        ValueError: a name that is not a layer of ``model`` with a feature-map output.
    """
    layers = names or default_layers(model, input_size=image_size)
    validate_layers(model, layers, input_size=image_size)
    return list(layers)


def select_layers_and_layouts(
    names: Sequence[str] | None,
    model: nn.Module,
    image_size: int,
    layout: str = "auto",
) -> tuple[list[str], dict[str, Layout]]:
    """:func:`select_layers` and the layers' layouts, decided once for the whole run.

    ``layout`` is the ``layout`` setting (:func:`~deltaft.app.checks.layout_setting`): ``auto``
    detects each layer's layout from dry forwards at two input sizes; ``BCHW``, ``BHWC`` or
    ``BNC`` declares it for every layer, ``LAYER=LAYOUT`` pairs for the layers they name (each a
    regularized layer); declarations are checked against the same forwards
    (:func:`~deltaft.layers.check_layers`). The objective and the
    attention estimation both take the result, so they read the maps on the same axis.

    Raises:
        ValueError: a name that is not a layer of ``model`` with a feature-map output, a layout
            that cannot be decided (the message says to pass ``--layout``) or a declared one
            that the maps contradict.
    """
    layers = list(names or default_layers(model, input_size=image_size))
    declared = layout_setting(layout)
    if isinstance(declared, dict):
        unknown = [name for name in declared if name not in layers]
        if unknown:
            raise SettingError(
                f"{{layout}} names {', '.join(unknown)}, not among the regularized layers "
                f"{', '.join(layers)}; name those layers (or set them with {{layers}})."
            )
    layouts = cast("Mapping[str, Layout] | Layout | None", declared)  # names checked above
    return layers, check_layers(model, layers, input_size=image_size, layouts=layouts)


def select_prefix_tokens(exclude: bool, model: nn.Module, layouts: Mapping[str, Layout]) -> int:
    """The leading tokens of ``(B, N, C)`` maps that a run leaves out: 0 unless ``exclude``
    (the ``exclude_prefix_tokens`` setting), then the count ``model`` declares
    (:func:`~deltaft.layouts.declared_prefix_tokens`: timm's ``num_prefix_tokens``, torchvision
    ViT's class token, Hugging Face ViT-style embeddings' class, distillation and register
    tokens). A user count is not offered: a wrong one would silently drop patch tokens or keep a
    class token.

    Raises:
        SettingError: ``exclude`` for a model that declares no count.
    """
    if not exclude:
        return 0
    count = declared_prefix_tokens(model)
    if count is None:
        raise SettingError(
            f"{{exclude_prefix_tokens}}: {type(model).__name__} declares no prefix tokens (no "
            "num_prefix_tokens attribute, class token or HF embeddings tokens); set "
            "model.num_prefix_tokens in its factory, or leave the setting off."
        )
    if "BNC" not in layouts.values():
        logger.warning(
            "--exclude-prefix-tokens has no effect: no regularized layer is a (B, N, C) token map."
        )
    return count


@dataclass
class BuiltRun:
    """What :func:`build_run` builds.

    Attributes:
        device: where training and estimation run.
        source: the pretrained network, as loaded (the frozen reference).
        info: the source's input size, normalisation and head.
        image_size: ``cfg.image_size`` or the model's.
        splits: the datasets (every image decoded once).
        skipped: the unreadable files :func:`verify_data` found.
        model: a copy of ``source`` with a new head for the target classes.
        head: the dotted name of that head.
    """

    device: torch.device
    source: nn.Module
    info: ModelInfo
    image_size: int
    splits: DataSplits
    skipped: list[str]
    model: nn.Module
    head: str

    @property
    def classes(self) -> list[str]:
        """The target classes, in label order."""
        return list(self.splits.classes)


def build_run(cfg: TrainConfig, device: torch.device, *, test: bool = True) -> BuiltRun:
    """Seed from ``cfg.seed``; build the source, the data (verified) and the target copy with a
    new head for the data's classes. The order is fixed: the head's initial weights come from
    the RNG state the steps before it leave.

    With ``test=False`` the test split is left out before any of its images is opened
    (``splits.test`` is ``None``): tuning never reads it.

    Raises:
        SettingError, ValueError: a bad model, weights or data (the message says which), an
            ``image_size`` the model cannot take, or a head that cannot be found or rebuilt
            (:mod:`deltaft.app.backbone_checks`).
    """
    seed_everything(cfg.seed)
    with head_as_setting():  # a head that cannot be found or rebuilt names the head setting
        source, info = build_model(cfg.model, weights=cfg.weights, head=cfg.head)
    image_size = cfg.image_size or info.input_size
    # The first dry forward: a size the model cannot take is one line naming the size it takes.
    check_input_size(source, image_size, name=cfg.model, native=info.input_size)
    logger.info(  # the size used, after image_size (build_model logs the weights' size at DEBUG)
        "Built %s (%s weights, head %s, input %d).", cfg.model, info.weights, info.head, image_size
    )
    splits = build_data(cfg, info, image_size)
    if not test:
        splits = dataclasses.replace(splits, test=None)
    skipped = verify_data(splits)
    model = copy.deepcopy(source)
    with head_as_setting():
        head = replace_head(model, len(splits.classes), info.head)
    return BuiltRun(device, source, info, image_size, splits, skipped, model, head)
