"""The application side of the base methods ``cotuning``, ``lwf`` and ``spd``.

* ``cotuning`` and ``lwf`` keep a trainable copy of the source's classifier head
  (:class:`~deltaft.objective.TransferObjective` builds it); ``lwf`` runs the frozen source to
  that head's output. ``cotuning`` also needs the category relationship, estimated here once
  before training from the source's predictions on the training images (evaluation transform, no
  augmentation), saved in the run folder as :data:`RELATIONSHIP_FILE` and checked on resume.
* ``spd`` is plain cross-entropy with :class:`~deltaft.optim.SGDSPD` (optimizer ``sgd``) or
  :class:`~deltaft.optim.AdamSPD` (optimizer ``adamw``), every tensor anchored at its value when
  training starts (the new head too, as in the authors' code).

Each method's settings (``cotuning_*``, ``lwf_*``, ``spd_lambda``) are ignored by the other
methods (:data:`~deltaft.app.methods.PART_SETTINGS`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import Dataset

from deltaft.app.build import BuiltRun, derived_seed, make_loader
from deltaft.app.config import TrainConfig
from deltaft.app.data.transforms import eval_transform
from deltaft.app.distributed import DistInfo
from deltaft.app.errors import SettingError
from deltaft.app.tracking import RunDir, file_sha256, load_checkpoint, save_checkpoint
from deltaft.cotuning import estimate_relationship
from deltaft.objective import Method
from deltaft.optim import SGDSPD, AdamSPD
from deltaft.source import FrozenSource

__all__ = [
    "HELD_OUT_FRACTION",
    "RELATIONSHIP_FILE",
    "held_out_split",
    "objective_settings",
    "run_relationship",
    "save_relationship",
    "source_layers",
    "spd_optimizer",
]

logger = logging.getLogger(__name__)

RELATIONSHIP_FILE = "relationship.pt"
#: Share of each class's training images the ``reverse`` estimator holds out when the data has
#: no validation split (at least one image of each class on each side).
HELD_OUT_FRACTION = 0.2


def objective_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The :class:`~deltaft.objective.TransferObjective` arguments that depend on ``cfg``'s base
    method: ``method``, ``alpha`` (the trade-off of ``cotuning`` / ``lwf``, else ``cfg.alpha``)
    and ``weight_decay``. ``spd`` is ``l2`` (plain cross-entropy) with no weight decay in the
    objective: its decay is the SPD optimizer's (:func:`spd_optimizer`)."""
    base = cfg.spec.base
    trade_offs = {"cotuning": cfg.cotuning_trade_off, "lwf": cfg.lwf_trade_off}
    return {
        "method": "l2" if base == "spd" else cast(Method, base),
        "alpha": trade_offs.get(base, cfg.alpha),
        "weight_decay": 0.0 if base == "spd" else cfg.weight_decay,
    }


def source_layers(cfg: TrainConfig, built: BuiltRun, layers: list[str] | None) -> list[str]:
    """The frozen source's hooked layers: the regularized ones, or for ``lwf`` its head (the
    source then runs to its logits)."""
    if cfg.spec.base == "lwf":
        return [built.head]
    return list(layers or [])


def spd_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """SGDSPD (``cfg.optimizer == "sgd"``, with ``cfg.momentum``) or AdamSPD (``"adamw"``, the
    authors' betas and eps), strength ``cfg.spd_lambda``, over ``groups`` (the objective's
    :meth:`~deltaft.objective.TransferObjective.param_groups`): every group is anchored at its
    current values, as in the authors' code (one group of every trainable parameter, ``pre`` its
    copy at construction): the backbone at its pre-trained weights, the new head at its initial
    values (the linear probe's with ``+lpft``)."""
    for group in groups:
        group["anchor"] = True
        group["weight_decay"] = cfg.spd_lambda
    if cfg.optimizer == "adamw":
        return AdamSPD(groups, lr=cfg.lr, weight_decay=cfg.spd_lambda)
    return SGDSPD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.spd_lambda)


# ------------------------------------------------------------------------------------------------
# Co-Tuning's relationship
# ------------------------------------------------------------------------------------------------
def held_out_split(labels: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(fit, held)`` indices: per class, ``round(HELD_OUT_FRACTION * n)`` images (at least 1,
    at most ``n - 1``) held out, chosen by a permutation seeded from ``seed``.

    Raises:
        SettingError: a class has fewer than 2 images.
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, "relationship") % 2**63)
    fit: list[Tensor] = []
    held: list[Tensor] = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        if n < 2:
            raise SettingError(
                f"{{cotuning_relationship}} reverse holds out training images of every class "
                f"when the data has no validation split, but class {c} has {n} training "
                "image(s); add a val/ folder or {val_split}, or use {cotuning_relationship} "
                "direct."
            )
        order = members[torch.randperm(n, generator=generator)]
        k = min(n - 1, max(1, round(HELD_OUT_FRACTION * n)))
        held.append(order[:k])
        fit.append(order[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _with_transform(dataset: Dataset[Any], transform: Any) -> Dataset[Any]:
    """A shallow copy of a split's dataset with another image transform."""
    if not hasattr(dataset, "transform"):
        raise ValueError(
            f"Cannot re-transform the training split ({type(dataset).__name__}) to estimate the "
            "Co-Tuning relationship; use an image folder or a tv: dataset."
        )
    view = copy.copy(dataset)
    view.transform = transform
    return view


def _source_logits(
    cfg: TrainConfig, built: BuiltRun, dataset: Dataset[Any]
) -> tuple[Tensor, Tensor]:
    """The frozen source's logits ``(N, K)`` and the labels ``(N,)`` of ``dataset``."""
    source = FrozenSource(built.source, [built.head]).to(built.device)
    logits: list[Tensor] = []
    labels: list[Tensor] = []
    for x, y in make_loader(dataset, cfg, built.device, shuffle=False):
        logits.append(source(x.to(built.device))[built.head].float().cpu())  # (B, K)
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def estimate_run_relationship(cfg: TrainConfig, built: BuiltRun) -> Tensor:
    """``R`` ``(C_target, K_source)`` from the source's predictions on the training images seen
    through the evaluation transform (``cfg.cotuning_relationship``; ``reverse`` fits on the
    validation split, or on :func:`held_out_split` of the training images without one)."""
    transform = eval_transform(built.image_size, cfg.preset, built.info.mean, built.info.std)
    train = _with_transform(built.splits.train, transform)
    num_classes = len(built.classes)
    train_logits, train_labels = _source_logits(cfg, built, train)
    val_logits = val_labels = None
    if built.splits.val is not None:
        val_logits, val_labels = _source_logits(cfg, built, built.splits.val)
    elif cfg.cotuning_relationship == "reverse":
        fit, held = held_out_split(train_labels, num_classes, cfg.seed)
        logger.info(
            "Co-Tuning relationship: no validation split; %d of %d training images held out "
            "to choose and calibrate the reverse estimator.",
            len(held),
            len(train_labels),
        )
        val_logits, val_labels = train_logits[held], train_labels[held]
        train_logits, train_labels = train_logits[fit], train_labels[fit]
    return estimate_relationship(
        train_logits,
        train_labels,
        num_classes,
        cfg.cotuning_relationship,
        val_logits=val_logits,
        val_labels=val_labels,
    ).float()


def run_relationship(
    cfg: TrainConfig,
    run: RunDir,
    resume_state: Mapping[str, Any] | None,
    built: BuiltRun,
    dist: DistInfo,
) -> Tensor:
    """The run's relationship: the run's own :data:`RELATIONSHIP_FILE` on resume (its sha256
    checked against the checkpoint's), else estimated on rank 0 and broadcast."""
    path = run.path / RELATIONSHIP_FILE
    if resume_state is not None:
        last = run.checkpoint_path()
        stored = resume_state.get("relationship_sha256")
        if not path.is_file() or stored != file_sha256(path):
            what = "is missing" if not path.is_file() else "is not the file"
            raise SettingError(
                f"{path}, the Co-Tuning relationship {last} was trained with, {what}; restore "
                "the run's own file to {resume}, or start a new {out}."
            )
        relationship = load_checkpoint(path)["relationship"]
        if not isinstance(relationship, Tensor):
            raise ValueError(f"{path} holds no relationship tensor; start a new run.")
        return relationship
    estimated = estimate_run_relationship(cfg, built) if dist.is_main else None
    return dist.broadcast_object(estimated)


def save_relationship(run: RunDir, relationship: Tensor, cfg: TrainConfig) -> str:
    """Write :data:`RELATIONSHIP_FILE` (rank 0) and return its sha256 (for every checkpoint)."""
    path = run.path / RELATIONSHIP_FILE
    state = {"relationship": relationship.cpu(), "method": cfg.cotuning_relationship}
    save_checkpoint(state, path)
    return file_sha256(path)
