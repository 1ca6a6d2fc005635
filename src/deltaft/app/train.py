"""``deltaft train`` as a function: build the run, fit it, summarize it.

:func:`run_training` changes global state on purpose, as a training script does: it seeds
Python, NumPy and torch from ``cfg.seed`` (and again at the start of every epoch, from
``(seed, epoch)``), so that a run is reproducible and a resumed run continues exactly as the
uninterrupted one would have. Call it from a script or from :mod:`deltaft.app.compare`; use
:mod:`deltaft.engine` and :class:`~deltaft.objective.TransferObjective` directly to train inside
your own loop. The build step is :mod:`deltaft.app.build`'s, the checkpoint policy
:mod:`deltaft.app.checkpoint`'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from deltaft.app import anchored, distributed
from deltaft.app.attention import estimate_attention, load_attention
from deltaft.app.build import (
    BuiltRun,
    build_run,
    make_loader,
    resolve_device,
    select_layers_and_layouts,
    select_prefix_tokens,
)
from deltaft.app.checkpoint import Checkpointer, open_run
from deltaft.app.checks import outside_data
from deltaft.app.config import TrainConfig
from deltaft.app.distributed import DistInfo, ShardSampler
from deltaft.app.errors import SettingError
from deltaft.app.loop import EpochFn, Loaders, TrainingLoop
from deltaft.app.methods import warn_ignored_settings
from deltaft.app.recipes import (
    LinearProbe,
    attention_head_reuse,
    check_wise_validation,
    head_state,
    prepare_probe,
    pretrained_state,
)
from deltaft.app.report import BalanceWarning
from deltaft.app.tracking import RunDir, file_sha256
from deltaft.attention import ChannelAttention, model_fingerprint
from deltaft.engine import Amp, ProgressFn, TrainingInterrupted
from deltaft.layers import Layout
from deltaft.objective import METHODS, TransferObjective
from deltaft.source import FrozenSource

__all__ = ["run_training"]

logger = logging.getLogger(__name__)

# Base methods and recipes this version trains; the others parse but are refused (see
# _check_available), so that a spec never trains as something else.
_TRAINED_BASES = frozenset(METHODS) | {"spd"}
_TRAINED_RECIPES: frozenset[str] = frozenset({"bss", "lpft", "wise"})


def _check_available(cfg: TrainConfig) -> None:
    """Refuse a method spec whose base or recipes this version cannot train yet."""
    spec = cfg.spec
    missing = [
        part for part in (spec.base, *spec.recipes) if part not in _TRAINED_BASES | _TRAINED_RECIPES
    ]
    if missing:
        raise SettingError(
            f"{{method}} {spec}: {', '.join(missing)} cannot be trained by this version yet; "
            f"use a base method of {', '.join(sorted(_TRAINED_BASES))}."
        )


def run_training(
    cfg: TrainConfig,
    *,
    progress: ProgressFn | None = None,
    dist: DistInfo | None = None,
    attention_progress: bool = False,
    test: bool = True,
    on_epoch: EpochFn | None = None,
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and write the run directory.

    Steps: seed; build the source network and the datasets; copy the source and give the copy a
    new head; for ``delta``, estimate the channel attention (or load ``cfg.attention``, checked
    against the source's fingerprint and the layers); build the
    :class:`~deltaft.objective.TransferObjective`, the optimizer (over
    ``objective.param_groups``) and a per-step lr schedule; train, evaluating on the validation
    split after every epoch; evaluate the last weights on the test split; write
    ``summary.json`` and the figures. ``best.pt`` is chosen by validation accuracy (the last
    epoch without a validation split), never by test accuracy. Nothing is written before every
    setting has been checked.

    With ``cfg.resume`` it continues from ``checkpoints/last.pt`` (model, optimizer, schedule,
    scaler, RNG states, epoch, metrics) and ends with the same weights and metrics as an
    uninterrupted run: each epoch reseeds the RNGs and the data order from ``(seed, epoch)``.
    On a single process, a first Ctrl-C stops training after the current step and saves
    ``last.pt`` with the epoch's progress (a second Ctrl-C stops at once); resuming replays the
    epoch's data order up to that step and continues it, again to the same result. SIGTERM and
    SIGHUP do the same under :func:`~deltaft.app.signals.terminate_as_interrupt` (the command
    line). An interrupt before training or a second one raises ``TrainingInterrupted`` saying
    what was kept.

    One process writes a run directory: ``cfg.out`` is claimed (created, and locked for the
    run's life, see :meth:`~deltaft.app.tracking.RunDir.claim`) before anything else is read or
    built; another process on the same directory is refused.

    Args:
        cfg: the run's settings.
        progress: called after every training step (see :class:`~deltaft.engine.Progress`);
            only on rank 0 under ``torchrun``.
        dist: the process group; default :func:`deltaft.app.distributed.current`.
        attention_progress: show a progress bar (tqdm, on stderr) while the channel attention
            is scored, which can take minutes on large models.
        test: ``False`` leaves the test split out before any of its images is opened (no test
            numbers in the summary: ``None``), as tuning on validation requires.
        on_epoch: called with each epoch's metrics row (``epoch``, ``val/acc``, ... as in
            ``metrics.jsonl``) after its checkpoint is saved; an exception it raises (e.g. a
            pruning decision) ends the run there and propagates.

    Returns:
        The summary, as written to ``summary.json``: ``val_accuracy`` / ``test_accuracy``
        (fractions in [0, 1], last epoch, ``None`` without that split), ``best_epoch``,
        ``best_val_accuracy``, ``best_test_accuracy`` (the ``best.pt`` weights), ``seconds``,
        ``skipped`` (``{"count", "files"}``), ``method``, ``seed``, ``config``, ...

    Raises:
        SettingError: a setting that cannot work: run directory, attention file, resume with
            other settings or weights, device.
        ValueError: invalid data, model or layers.
        NonFiniteLossError: the loss diverged; ``last.pt`` keeps the last finished epoch.
        TrainingInterrupted: Ctrl-C (or SIGTERM, see above); the message says what was saved
            and how to go on.
    """
    started = time.perf_counter()
    _check_available(cfg)
    warn_ignored_settings(cfg)
    check_wise_validation(cfg)  # an image folder without val/: before the run folder is made
    dist = dist or distributed.current()
    outside_data(cfg.out, cfg.data)  # before the claim creates the folder
    run = RunDir(cfg.out, write=dist.is_main)
    try:
        resume_state = open_run(run, cfg)
        dist.barrier()  # every process checked the directory before rank 0 writes to it
        training = _build(cfg, run, dist, resume_state, started, attention_progress, test)
        training.on_epoch = on_epoch
        training.fit(progress)
        return training.summarize()
    except TrainingInterrupted:
        raise  # it says what was saved
    except KeyboardInterrupt:  # while building or estimating, or a second Ctrl-C
        raise TrainingInterrupted(_interrupted(run)) from None
    finally:
        run.release()


def _interrupted(run: RunDir) -> str:
    """What an interrupt outside a clean stop leaves, and the command that goes on from there."""
    last = run.checkpoint_path()
    if last.is_file():
        return (
            f"Interrupted; {last} is unchanged; continue it with: deltaft train --out "
            f"{run.path} --resume"
        )
    if run.config_path.is_file():
        return (
            f"Interrupted before the first checkpoint: no training was saved; start it again "
            f"with: deltaft train --out {run.path} --resume"
        )
    return "Interrupted before the run started: nothing was saved; run the same command again."


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------
def _device_tweaks(cfg: TrainConfig, device: torch.device) -> tuple[Amp, bool]:
    """``(amp, channels_last)`` as they apply on ``device`` (both are CUDA-only)."""
    amp, channels_last = cfg.amp, cfg.channels_last
    if device.type != "cuda" and (amp != "none" or channels_last):
        logger.warning("--amp/--channels-last apply on CUDA only; ignored on %s.", device)
        return "none", False
    return amp, channels_last


def _layers(cfg: TrainConfig, built: BuiltRun) -> tuple[list[str] | None, dict[str, Layout]]:
    """The regularized layers (``fm``/``delta``), validated, and their layouts, decided once;
    ``(None, {})`` for the other methods."""
    if not cfg.spec.feature_maps:
        return None, {}
    return select_layers_and_layouts(cfg.layers, built.model, built.image_size, cfg.layout)


def _attention(
    cfg: TrainConfig,
    run: RunDir,
    resume_state: Mapping[str, Any] | None,
    built: BuiltRun,
    layers: list[str],
    layouts: Mapping[str, Layout],
    prefix_tokens: int,
    dist: DistInfo,
    progress: bool,
    on_probe: Callable[[nn.Module], None] | None = None,
) -> ChannelAttention:
    """The run's attention: the run's own file on resume, ``cfg.attention``, or estimated on
    rank 0 and broadcast to the other processes (``on_probe``: see
    :func:`~deltaft.app.attention.estimate_attention`)."""
    if resume_state is not None:
        _check_attention_file(run, resume_state)
        stored = resume_state.get("layers") or None
        return load_attention(run.attention_path, built.source, stored, setting="resume")
    if cfg.attention:
        explicit = layers if cfg.layers is not None else None
        return load_attention(
            cfg.attention, built.source, explicit, setting="attention", train=built.splits.train
        )
    estimated = None
    if dist.is_main:
        train, classes = built.splits.train, len(built.classes)
        estimated = estimate_attention(
            cfg,
            built.source,
            train,
            layers,
            classes,
            built.head,
            built.device,
            progress=progress,
            layouts=layouts,
            prefix_tokens=prefix_tokens,
            on_probe=on_probe,
        )
    return dist.broadcast_object(estimated)


def _check_attention_file(run: RunDir, resume_state: Mapping[str, Any]) -> None:
    """Refuse to resume with another attention file than the one the checkpoint was trained
    with (its sha256 is in every checkpoint): the loss would change silently mid-run."""
    stored = resume_state.get("attention_sha256")
    last = run.checkpoint_path()
    if not isinstance(stored, str):
        raise SettingError(
            f"{last} does not record the attention file it was trained with; continue it with "
            "the deltaft version that wrote it, or start a new {out}."
        )
    if not run.attention_path.is_file():
        raise SettingError(
            f"{run.attention_path}, the attention {last} was trained with, is missing; restore "
            "it to {resume}, or start a new {out}."
        )
    if file_sha256(run.attention_path) != stored:
        raise SettingError(
            f"{run.attention_path} is not the attention file {last} was trained with (another "
            "sha256); restore the run's own file to {resume}, or start a new {out}."
        )


def _objective(
    cfg: TrainConfig,
    built: BuiltRun,
    layers: list[str] | None,
    attention: ChannelAttention | None,
    layouts: Mapping[str, Layout],
    prefix_tokens: int,
    relationship: torch.Tensor | None = None,
) -> TransferObjective:
    """The training objective: ``built.model`` regularized towards ``built.source``."""
    hooked = anchored.source_layers(cfg, built, layers)
    source = FrozenSource(built.source, hooked, bn=cfg.source_bn, mkldnn=cfg.source_mkldnn)
    return TransferObjective(
        built.model,
        source,
        layers=layers,
        attention=attention,
        beta=cfg.beta,
        head=built.head,
        reduction=cfg.reduction,
        input_size=built.image_size,
        relationship=relationship,
        lwf_temperature=cfg.lwf_temperature,
        layouts=dict(layouts) if layers else None,
        prefix_tokens=prefix_tokens,
        # -- recipe +bss: Batch Spectral Shrinkage of the head's input
        bss=cfg.bss_eta if cfg.spec.has("bss") else 0.0,
        bss_k=cfg.bss_k,
        **anchored.objective_settings(cfg),  # method: checked by _check_available
    )


def _loaders(cfg: TrainConfig, built: BuiltRun, dist: DistInfo) -> Loaders:
    """Raises ``ValueError`` when the training split yields no batch."""
    train, device = built.splits.train, built.device
    # The data order comes from (seed, epoch): the generator is reseeded every epoch.
    generator = torch.Generator()
    sampler: DistributedSampler[Any] | None = None
    if dist.enabled:
        sampler = DistributedSampler(
            train, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    n_train = len(train)  # type: ignore[arg-type]
    train_loader = make_loader(
        train,
        cfg,
        device,
        shuffle=True,
        generator=generator,
        sampler=sampler,
        drop_last=n_train >= cfg.batch_size * dist.world_size,  # no last batch of 1 for BN
    )
    if len(train_loader) == 0:
        raise ValueError(f"The training split of {cfg.data} is empty; add images.")
    splits: dict[str, Dataset[Any] | None] = {"val": built.splits.val, "test": built.splits.test}
    evaluation = {
        name: make_loader(
            split,
            cfg,
            device,
            shuffle=False,
            sampler=ShardSampler(split, dist) if dist.enabled else None,  # type: ignore[arg-type]
        )
        for name, split in splits.items()
        if split is not None
    }
    return Loaders(train_loader, evaluation, generator, sampler)


def _optimizer(cfg: TrainConfig, objective: TransferObjective) -> torch.optim.Optimizer:
    groups = objective.param_groups(lr=cfg.lr, head_lr=cfg.head_lr)
    if cfg.spec.base == "spd":
        return anchored.spd_optimizer(cfg, groups)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules; see :class:`~deltaft.app.config.TrainConfig` ``schedule``."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "exponential":
        gamma = cfg.lr_gamma ** (1.0 / total_steps)
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    milestone = max(1, round(cfg.step_at * total_steps))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone], gamma=cfg.lr_gamma)


def _budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """``(epochs, total steps, steps of the last epoch)``: with ``iterations``,
    ``epochs = ceil(iterations / steps_per_epoch)`` and the last epoch stops early."""
    if cfg.iterations is not None:
        epochs = math.ceil(cfg.iterations / steps_per_epoch)
        return epochs, cfg.iterations, cfg.iterations - (epochs - 1) * steps_per_epoch
    assert cfg.epochs is not None  # TrainConfig resolves one of the two
    return cfg.epochs, cfg.epochs * steps_per_epoch, steps_per_epoch


def _build(
    cfg: TrainConfig,
    run: RunDir,
    dist: DistInfo,
    resume_state: Mapping[str, Any] | None,
    started: float,
    attention_progress: bool,
    test: bool = True,
) -> TrainingLoop:
    """Everything the run needs, restored from ``resume_state`` when given; the order of the
    steps is fixed (the RNG states they leave decide the initial weights)."""
    device = resolve_device(cfg.device, dist)
    amp, channels_last = _device_tweaks(cfg, device)
    built = build_run(cfg, device, test=test)
    check_wise_validation(cfg, built)  # before anything trains
    fingerprint = model_fingerprint(built.source)
    if resume_state is not None and resume_state.get("model_fingerprint") != fingerprint:
        raise SettingError(
            f"The source weights ({cfg.model}, {{weights}} {cfg.weights}) differ from those "
            f"the run in {run.path} started from; resume with the same weights or start a "
            "new {out}."
        )
    layers, layouts = _layers(cfg, built)
    prefix = select_prefix_tokens(cfg.exclude_prefix_tokens, built.source, layouts) if layers else 0
    attention, attention_seconds = None, 0.0
    reused, on_probe = _probe_reuse(cfg, built, resume_state, layers)
    if cfg.spec.base == "delta" and layers is not None:
        tic = time.perf_counter()
        attention = _attention(
            cfg,
            run,
            resume_state,
            built,
            layers,
            layouts,
            prefix,
            dist,
            attention_progress,
            on_probe,
        )
        attention_seconds = time.perf_counter() - tic
        if cfg.layers is None and attention.layers != layers:  # a loaded file's layers
            layers, layouts = select_layers_and_layouts(
                attention.layers, built.model, built.image_size, cfg.layout
            )
    # -- recipes +lpft and +wise: the linear probe, theta_0 (before training changes the model)
    probe = prepare_probe(
        cfg, built, resume_state, reused[0] if reused else None, dist.broadcast_object, dist.is_main
    )
    theta0 = pretrained_state(built, probe) if probe is not None and cfg.spec.has("wise") else None
    relationship = None
    if cfg.spec.base == "cotuning":
        relationship = anchored.run_relationship(cfg, run, resume_state, built, dist)
    objective = _objective(cfg, built, layers, attention, layouts, prefix, relationship)
    objective = objective.to(device)
    if channels_last:
        objective.to(memory_format=torch.channels_last)
    loaders = _loaders(cfg, built, dist)
    epochs, total_steps, last_steps = _budget(cfg, len(loaders.train))
    optimizer = _optimizer(cfg, objective)
    scheduler = _scheduler(cfg, optimizer, total_steps)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    meta = {  # what every checkpoint carries besides weights: enough to rebuild and evaluate
        "config": cfg.to_dict(),
        "classes": built.classes,
        "head": built.head,
        "model_fingerprint": fingerprint,
        "layers": list(layers or []),
        "image_size": built.image_size,
        "mean": list(built.info.mean),
        "std": list(built.info.std),
    }
    if probe is not None:  # a resumed run restores the probe rather than probing again
        meta["probe_head"] = probe.head
    checkpointer = Checkpointer(
        run,
        meta,
        model=objective.model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        epochs=epochs,
        started=started,
        extra={} if objective.kept_head is None else {"kept_head": objective.kept_head},
    )
    if relationship is not None and dist.is_main:  # every checkpoint names the file (resume)
        relationship_file = run.path / anchored.RELATIONSHIP_FILE
        checkpointer.meta["relationship_sha256"] = (
            anchored.save_relationship(run, relationship, cfg)
            if resume_state is None
            else file_sha256(relationship_file)
        )
    loop = checkpointer.begin(cfg, resume_state)
    if attention is not None and dist.is_main:
        if resume_state is None:
            attention.save(run.attention_path)
        # Every checkpoint names the attention file it depends on (checked on resume).
        checkpointer.meta["attention_sha256"] = file_sha256(run.attention_path)
    return TrainingLoop(
        cfg=cfg,
        run=run,
        dist=dist,
        built=built,
        amp=amp,
        channels_last=channels_last,
        objective=objective,
        loaders=loaders,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        epochs=epochs,
        last_steps=last_steps,
        checkpointer=checkpointer,
        loop=loop,
        attention=attention,
        attention_seconds=attention_seconds,
        balance=BalanceWarning(cfg),
        probe=probe,
        theta0=theta0,
    )


def _probe_reuse(
    cfg: TrainConfig,
    built: BuiltRun,
    resume_state: Mapping[str, Any] | None,
    layers: list[str] | None,
) -> tuple[list[LinearProbe], Callable[[nn.Module], None] | None]:
    """Where the attention head is kept when it is the linear probe (+lpft, +wise), and the
    callback that keeps it; ``([], None)`` otherwise (the reason is logged)."""
    spec = cfg.spec
    if resume_state is not None or not (spec.has("lpft") or spec.has("wise")):
        return [], None
    estimates = spec.base == "delta" and layers is not None and not cfg.attention
    why_not = attention_head_reuse(cfg, estimates_attention=estimates)
    if why_not is not None:
        if spec.base == "delta":
            logger.info("linear probe: trained on its own (%s).", why_not)
        return [], None
    kept: list[LinearProbe] = []

    def keep(model: nn.Module) -> None:
        kept.append(LinearProbe(head_state(model, built.head), "attention head"))

    return kept, keep
