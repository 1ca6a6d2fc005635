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

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deltaft.app.checks import outside_data
from deltaft.app.compare import SCRATCH, parse_methods
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError, literal
from deltaft.app.tracking import RunDir
from deltaft.app.tune_report import TuneResult, write_results
from deltaft.app.tune_space import method_space
from deltaft.app.tune_study import (
    INSTALL,
    TuneOptions,
    check_validation,
    open_study,
    require_optuna,
    storage_of,
    trial_config,
)
from deltaft.app.tune_trial import TuneContext

if TYPE_CHECKING:
    from deltaft.engine import ProgressFn

__all__ = ["INSTALL", "TuneOptions", "TuneResult", "run_tune", "work_in_processes"]

logger = logging.getLogger(__name__)


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
    require_optuna()
    storage = storage_of(out, options.storage)
    for method in methods:
        open_study(base, method, spaces[method], options, storage)
    context = TuneContext(base, out, options, spaces, progress)
    if options.jobs == 1:
        context.work(storage)
    else:
        work_in_processes(context, options.jobs)
    return write_results(base, methods, spaces, out, options, storage)


# ------------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------------
def _job_work(job: tuple[TuneContext, int]) -> None:
    context, level = job
    # The job's package logger passes warnings only (init_job_process); the trial lines
    # (progress, ETA) pass at the parent's level.
    logging.getLogger("deltaft.app.tune_trial").setLevel(level)
    context.work()


def work_in_processes(context: TuneContext, jobs: int) -> None:
    """Run ``jobs`` workers at once, each in its own process (``spawn``) with
    ``threads // jobs`` torch threads; they share the studies through the storage. Their log
    records reach this process's ``deltaft`` loggers; Ctrl-C or this process's death ends them.
    """
    import torch

    from deltaft.app.jobs import job_pool

    for method in context.spaces:  # the shared attention estimates: once, here, not per job
        context.attention_for(method)
    quiet = TuneContext(
        context.base, context.out, context.options, context.spaces, None, dict(context.attention)
    )
    threads = max(1, torch.get_num_threads() // jobs)
    level = logging.getLogger("deltaft").getEffectiveLevel()
    logger.info("tune: %d processes, %d torch thread(s) each", jobs, threads)
    interrupted = (
        "interrupted; finished trials are kept, and the same command continues the study (the "
        "interrupted trials are marked failed and retried)."
    )
    with job_pool(jobs, threads, interrupted) as pool:
        work = [(quiet, level)] * jobs
        for _ in pool.imap_unordered(_job_work, work):
            pass
