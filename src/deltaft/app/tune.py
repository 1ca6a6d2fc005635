"""``deltaft tune``: each method's hyperparameters chosen on validation, with Optuna.

For every method spec a study ``deltaft:<method>`` samples settings from the method's own space
(:mod:`deltaft.app.tune_space`) with TPE (or a grid); each trial is a normal
:func:`~deltaft.app.train.run_training` of the base configuration with the trial's settings, in
``OUT/trials/<method>/<number>``, scored by its last epoch's **validation** accuracy. The test
split is never opened (``run_training(test=False)``). Poor trials are pruned from their
per-epoch validation accuracy (median rule or successive halving).

The studies live in an Optuna storage (default: the journal file ``OUT/study.log``; any Optuna
storage URL, e.g. PostgreSQL, to share them between machines), so several processes work on
them at once and a killed tune continues when run again: finished trials are kept, a trial left
RUNNING by a process that died (same machine: its pid is gone; elsewhere: no heartbeat for
``GRACE_S``) is marked failed and its settings are tried again. ``trials`` counts finished
(complete or pruned) trials per method across every process. The results are written by
:mod:`deltaft.app.tune_report`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deltaft.app.checks import outside_data
from deltaft.app.compare import SCRATCH, parse_methods
from deltaft.app.config import RUNTIME_KEYS, TrainConfig
from deltaft.app.errors import SettingError, literal
from deltaft.app.methods import MethodSpec
from deltaft.app.tracking import RunDir
from deltaft.app.tune_space import Param, method_space

if TYPE_CHECKING:
    import optuna

    from deltaft.app.tune_report import TuneResult
    from deltaft.engine import ProgressFn

__all__ = [
    "GRACE_S",
    "HEARTBEAT_S",
    "INSTALL",
    "TuneOptions",
    "check_validation",
    "grid_order",
    "open_study",
    "run_tune",
    "storage_of",
    "study_name",
    "trial_config",
]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'deltaft[tune]' (or pip install optuna)"
HEARTBEAT_S = 20.0  # a running trial writes its time this often
GRACE_S = 300.0  # a RUNNING trial with no heartbeat for this long is taken as dead
Sampler = Literal["tpe", "grid"]
Pruner = Literal["median", "halving", "none"]
Keep = Literal["best", "all", "none"]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError(f"deltaft tune needs Optuna: {INSTALL}.") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class TuneOptions:
    """How to tune (see :func:`run_tune`).

    Attributes:
        trials: finished (complete or pruned) trials per method, across every process.
        sampler: ``tpe`` (seeded from the base ``seed``) or ``grid`` (each space's grid points).
        pruner: ``median`` (Optuna's MedianPruner), ``halving`` (successive halving) or ``none``.
        storage: an Optuna storage URL; ``None``: the journal file ``OUT/study.log``.
        jobs: trials at once, each in its own process with ``threads // jobs`` torch threads.
        keep_trials: which trial run folders stay: ``best`` (each method's best), ``all``,
            ``none``.
        space: the user's ``search_space`` entries
            (:func:`~deltaft.app.tune_space.parse_search_space`).
    """

    trials: int = 20
    sampler: Sampler = "tpe"
    pruner: Pruner = "median"
    storage: str | None = None
    jobs: int = 1
    keep_trials: Keep = "best"
    space: Mapping[str, Mapping[str, Param | None]] | None = None

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise SettingError(f"{{trials}} must be >= 1, got {self.trials}.")
        if self.jobs < 1:
            raise SettingError(f"{{jobs}} must be >= 1, got {self.jobs}.")
        for name, value, allowed in (
            ("sampler", self.sampler, ("tpe", "grid")),
            ("pruner", self.pruner, ("median", "halving", "none")),
            ("keep_trials", self.keep_trials, ("best", "all", "none")),
        ):
            if value not in allowed:
                raise SettingError(
                    f"{{{name}}} must be one of {', '.join(allowed)}, got {literal(repr(value))}."
                )


def study_name(method: str) -> str:
    """The study of ``method`` in the storage: ``deltaft:<spec>``."""
    return f"deltaft:{method}"


def check_validation(cfg: TrainConfig) -> None:
    """Refuse, before any work, data without a validation split: tuning scores on it.

    The splits are resolved as training would (folders listed, no image decoded).
    """
    from deltaft.app.data import build_datasets

    splits = build_datasets(
        cfg.data,
        image_size=cfg.image_size or 32,
        preset=cfg.preset,
        per_class=cfg.per_class,
        fraction=cfg.fraction,
        val_split=cfg.val_split,
        seed=cfg.seed,
        download=cfg.download,
        data_root=cfg.data_root,
    )
    if splits.val is None:
        raise SettingError(
            f"{{data}} {literal(cfg.data)} has no validation split, and tuning scores every "
            "trial on validation (never on test): pass {val_split} 0.2 or add a val/ folder."
        )


def trial_config(
    base: TrainConfig, method: str, params: Mapping[str, Any], out: Path
) -> TrainConfig:
    """``base`` with ``method``, the trial's settings and its run folder (validated)."""
    spec = MethodSpec.parse(method)
    changes: dict[str, Any] = {"method": str(spec), "out": str(out), "resume": False, **params}
    if not spec.feature_maps:
        changes["layers"] = None
    if spec.base != "delta":
        changes["attention"] = None
    return dataclasses.replace(base, **changes)


def _stored_settings(base: TrainConfig, space: Mapping[str, Param]) -> dict[str, Any]:
    """The base settings a study is bound to: runtime settings, ``out`` and the tuned ones
    aside."""
    ignored = RUNTIME_KEYS | {"method"} | set(space)
    return {k: v for k, v in base.to_dict().items() if k not in ignored}


def _differences(old: Any, new: Any) -> str:
    """``key: A there, B now`` for each differing key of two dicts; else both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)
    return f"{old!r} there, {new!r} now"


def _sampler(options: TuneOptions, seed: int) -> Any:
    """TPE, seeded; with ``grid`` the points are enqueued (see ``grid_order``) and the sampler
    is never asked."""
    optuna = _optuna()
    startup = min(10, max(3, options.trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def grid_order(space: Mapping[str, Param], seed: int) -> list[dict[str, Any]]:
    """Every point of ``space``'s grid, in an order shuffled by ``seed``."""
    import itertools
    import random

    names = list(space)
    points = [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(space[n].grid_points() for n in names))
    ]
    random.Random(seed).shuffle(points)
    return points


def _pruner(options: TuneOptions) -> Any:
    optuna = _optuna()
    if options.pruner == "median":
        startup = max(2, min(5, options.trials // 4))
        # Steps are epochs (from 1): the first epoch never prunes.
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=2)
    if options.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def storage_of(out: Path, url: str | None) -> Any:
    """The Optuna storage: ``url``, or the journal file ``out/study.log`` (file lock)."""
    optuna = _optuna()
    if url is not None:
        return url
    from optuna.storages.journal import JournalFileBackend

    out.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.log")))


def open_study(
    base: TrainConfig, method: str, space: Mapping[str, Param], options: TuneOptions, storage: Any
) -> optuna.Study:
    """Create or load the study of ``method``; refuse one that was run with other settings."""
    optuna = _optuna()
    study = optuna.create_study(
        study_name=study_name(method),
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=_pruner(options),
    )
    bound = {
        "deltaft:config": _stored_settings(base, space),
        "deltaft:space": sorted(p.describe() for p in space.values()),
        "deltaft:sampler": options.sampler,
    }
    stored = study.user_attrs
    for key, value in bound.items():
        if key not in stored:
            study.set_user_attr(key, value)
        elif stored[key] != value:
            differs = key.split(":")[1]
            raise SettingError(
                f"The study {literal(study_name(method))} in this storage was run with another "
                f"{literal(differs)} ({literal(_differences(stored[key], value))}); use another "
                "{out} or {storage} for other settings, or the same ones to continue it."
            )
    return study


def run_tune(
    base: TrainConfig,
    methods: Sequence[str],
    out: str | Path,
    options: TuneOptions,
    *,
    progress: ProgressFn | None = None,
) -> TuneResult:
    """Tune every method of ``methods`` on validation; write ``out``'s results.

    Everything is checked before the first trial: the methods and their spaces (each space's
    ends build a valid configuration), that the data has a validation split, that ``out`` is not
    a training run nor inside the data, and that each study in the storage (if any) was run
    with the same base settings, space and sampler. Then each method's study runs until it has
    ``options.trials`` finished trials (in this process, or in ``options.jobs`` processes; other
    ``deltaft tune`` processes on the same storage share the count), and the results are
    written (:func:`deltaft.app.tune_report.write_results`).

    Raises:
        ValueError: a bad method, space, option or data (``SettingError`` for a setting), or
            Optuna missing (the message says how to install it); three trials failing in a row
            before any finished (the last message is given).
        TrainingInterrupted: Ctrl-C; the interrupted trial is recorded as failed and retried
            when the same command runs again.
    """
    from deltaft.app.tune_report import write_results
    from deltaft.app.tune_trial import TuneContext, work_in_processes

    out = Path(out)
    methods = parse_methods(methods)
    if SCRATCH in methods:
        raise SettingError(
            "{methods}: 'scratch' cannot be tuned; tune l2 (the same method from the source "
            "weights) instead."
        )
    spaces = {method: method_space(method, options.space) for method in methods}
    for method, space in spaces.items():
        if not space:
            raise ValueError(f"The search space of {method} is empty: nothing to tune.")
        for end in ("low", "high"):  # every setting's ends make a valid configuration
            values = {n: getattr(p, end) for n, p in space.items() if p.low is not None}
            trial_config(base, method, values, out)
    outside_data(out, base.data)
    if RunDir(out).holds_run():
        raise SettingError(
            f"{{out}} {literal(out)} holds a training run, not a tuning folder; choose another "
            "{out}."
        )
    check_validation(base)
    _optuna()
    storage = storage_of(out, options.storage)
    for method in methods:
        open_study(base, method, spaces[method], options, storage)
    context = TuneContext(base, out, options, spaces, progress)
    if options.jobs == 1:
        context.work(0, storage)
    else:
        work_in_processes(context, options.jobs)
    return write_results(base, methods, spaces, out, options, storage)
