"""The studies of ``deltaft tune``: options, storage, samplers, pruners, checks.

See :mod:`deltaft.app.tune` for the whole; a study per method lives in an Optuna storage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deltaft.app.build import require_validation
from deltaft.app.config import RUNTIME_KEYS, TrainConfig
from deltaft.app.errors import SettingError, literal
from deltaft.app.methods import MethodSpec, for_method
from deltaft.app.tune_space import Param

if TYPE_CHECKING:
    import optuna


__all__ = [
    "GRACE_S",
    "HEARTBEAT_S",
    "INSTALL",
    "TuneOptions",
    "check_validation",
    "grid_order",
    "open_study",
    "require_optuna",
    "shared_attention",
    "storage_of",
    "study_name",
    "tpe_sampler",
    "trial_config",
]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'deltaft[tune]' (or pip install optuna)"
HEARTBEAT_S = 20.0  # a running trial writes its time this often
GRACE_S = 300.0  # a RUNNING trial with no heartbeat for this long is taken as dead
Sampler = Literal["tpe", "grid"]
Pruner = Literal["median", "halving", "none"]
Keep = Literal["best", "all", "none"]


def require_optuna() -> Any:
    """The ``optuna`` module (its logging at warnings); a ``ValueError`` saying how to
    install it when it is missing."""
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
    """Refuse, before any work, data without a validation split: tuning scores on it."""
    require_validation(cfg, "Tuning scores every trial on the validation split")


def trial_config(
    base: TrainConfig, method: str, params: Mapping[str, Any], out: Path
) -> TrainConfig:
    """``base`` with ``method``, the trial's settings and its run folder (validated); the
    settings ``method`` does not use at their defaults."""
    return for_method(base, method, out=str(out), resume=False, **params)


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


def tpe_sampler(options: TuneOptions, seed: int) -> Any:
    """TPE, seeded; with ``grid`` the points are enqueued (see ``grid_order``) and the sampler
    is never asked."""
    optuna = require_optuna()
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
    optuna = require_optuna()
    if options.pruner == "median":
        startup = max(2, min(5, options.trials // 4))
        # Steps are epochs (from 1): the first epoch never prunes.
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=2)
    if options.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def storage_of(out: Path, url: str | None) -> Any:
    """The Optuna storage: ``url`` (a database URL, opened here), or the journal file
    ``out/study.log`` (file lock: processes on one machine).

    Raises:
        SettingError: ``url`` is not a database URL, or the database cannot be opened (the
            reason in one line).
    """
    optuna = require_optuna()
    if url is not None:
        if "://" not in url:
            raise SettingError(
                f"{{storage}} {literal(repr(url))} is not a database URL; e.g. "
                "sqlite:///tune.db or postgresql://user:password@host/db (without {storage}: "
                "the journal file OUT/study.log)."
            )
        try:
            return optuna.storages.get_storage(url)
        except Exception as error:  # sqlalchemy's and drivers' errors have no common base
            reason = " ".join(str(error).split("\n")[0].split())
            raise SettingError(
                f"{{storage}} {literal(url)} cannot be opened: {type(error).__name__}: "
                f"{literal(reason)}"
            ) from None
    from optuna.storages.journal import JournalFileBackend

    out.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.log")))


def open_study(
    base: TrainConfig, method: str, space: Mapping[str, Param], options: TuneOptions, storage: Any
) -> optuna.Study:
    """Create or load the study of ``method``; refuse one that was run with other settings."""
    optuna = require_optuna()
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


# Settings used only after the attention is estimated: a space of these alone lets every trial of
# a delta study reuse one estimate (the estimate depends on the data, model, layers, seed,
# batch size and attention settings, never on these).
_AFTER_ATTENTION = frozenset(
    {"lr", "head_lr", "alpha", "beta", "weight_decay", "momentum", "optimizer", "schedule",
     "step_at", "lr_gamma", "epochs", "iterations", "reduction", "source_bn", "bss_eta", "lp_lr"}
)  # fmt: skip


def shared_attention(
    base: TrainConfig, method: str, space: Mapping[str, Param], out: Path
) -> str | None:
    """The attention file every trial of a ``delta`` study can reuse, estimated once.

    ``OUT/attention/<method>.safetensors``, estimated with the trials' own settings
    (:func:`deltaft.app.attention.run_attention`, the same result a trial's run would estimate)
    when missing, written by rename so that concurrent processes never read half a file.
    ``None`` (each trial estimates its own) for another base method, a ``base.attention``
    given, or a space that tunes a setting the estimate depends on.
    """
    import os

    from deltaft.app.attention import run_attention

    if (
        MethodSpec.parse(method).base != "delta"
        or base.attention
        or not set(space) <= _AFTER_ATTENTION
    ):
        return None
    path = out / "attention" / f"{method}.safetensors"
    if not path.is_file():
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.safetensors")
        partial.unlink(missing_ok=True)
        run_attention(trial_config(base, method, {}, out / "attention"), partial)
        os.replace(partial, path)
    return str(path)
