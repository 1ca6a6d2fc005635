"""The trials of ``deltaft tune``: the per-process loop, one trial's run, stale trials.

See :mod:`deltaft.app.tune`. A worker (this process, or one of ``--jobs`` processes, or another
``deltaft tune`` on the same storage) runs trials of one method's study until the study has
enough finished ones; each trial records its host, pid and a heartbeat, so that a trial left
RUNNING by a process that died is found, marked failed and retried.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaft.app.build import derived_seed
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError
from deltaft.app.tune_space import Param
from deltaft.app.tune_study import (
    GRACE_S,
    HEARTBEAT_S,
    TuneOptions,
    grid_order,
    open_study,
    require_optuna,
    shared_attention,
    storage_of,
    tpe_sampler,
    trial_config,
)
from deltaft.engine import NonFiniteLossError, ProgressFn

__all__ = [
    "Heartbeat",
    "TrialOutcome",
    "TuneContext",
    "fail_stale_trials",
    "run_trial",
]

logger = logging.getLogger(__name__)

_FAILS_IN_A_ROW = 3  # with no finished trial yet: the settings, not the trials, are wrong


@dataclass
class TuneContext:
    """What a worker (this process or a job) needs to run trials."""

    base: TrainConfig
    out: Path
    options: TuneOptions
    spaces: dict[str, dict[str, Param]]
    progress: ProgressFn | None = None
    attention: dict[str, str | None] = field(default_factory=dict)  # per method, once known

    def attention_for(self, method: str) -> str | None:
        """The attention file the trials of ``method`` share (see ``shared_attention``)."""
        if method not in self.attention:
            space = self.spaces[method]
            self.attention[method] = shared_attention(self.base, method, space, self.out)
        return self.attention[method]

    def work(self, storage: Any = None) -> None:
        """Run each method's trials until its study has enough finished ones."""
        storage = storage if storage is not None else storage_of(self.out, self.options.storage)
        for index, method in enumerate(self.spaces):
            study = open_study(self.base, method, self.spaces[method], self.options, storage)
            _Worker(self, method, study, len(self.spaces) - index - 1).run()


def _state(trial: Any) -> str:
    return str(trial.state.name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Worker:
    """Runs trials of one method's study in this process.

    Before each trial: stale trials are failed and retried, and the study's finished trials
    (complete or pruned) are counted against :attr:`target`, those other processes are running
    too. Once asked for, a trial's settings are sampled with the sampler seeded from ``(seed,
    method, trial number)``: the storage numbers trials uniquely, so the same run of one process
    samples the same settings, and two processes on one storage (or ``--jobs`` workers) sample
    different ones.
    """

    context: TuneContext
    method: str
    study: Any
    methods_after: int
    fails_in_a_row: int = 0
    seconds: list[float] = field(default_factory=list)  # of the trials this worker ran

    @property
    def target(self) -> int:
        """Finished trials wanted: ``trials``, at most the grid's size with ``grid``."""
        if self.context.options.sampler == "grid":
            grid = 1
            for param in self.context.spaces[self.method].values():
                grid *= len(param.grid_points())
            return min(self.context.options.trials, grid)
        return self.context.options.trials

    def run(self) -> None:
        """Ask, run and tell trials until the study has :attr:`target` finished ones."""
        optuna = require_optuna()
        states = optuna.trial.TrialState
        while True:
            fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state in (states.COMPLETE, states.PRUNED) for t in trials)
            running = sum(t.state == states.RUNNING for t in trials)
            waiting = sum(t.state == states.WAITING for t in trials)
            if finished >= self.target:
                return
            failed = [t for t in trials if t.state == states.FAIL and not _given_back(t)]
            if len(failed) >= self.target:  # TPE learns nothing from failed trials
                logger.warning(
                    "tune %s: %d trials failed and %d of %d finished: this study stops here. "
                    "Their errors are in tune.json; narrow the search space away from them (e.g. "
                    "a lower lr range) in a new --out.",
                    self.method, len(failed), finished, self.target,
                )  # fmt: skip
                return
            if finished + running >= self.target and not waiting:
                logger.info(
                    "tune %s: the %d remaining trial(s) run in other processes",
                    self.method, self.target - finished,
                )  # fmt: skip
                return
            grid = self.context.options.sampler == "grid"
            if grid and not waiting:
                point = self._next_grid_point(trials)
                if point is None:
                    return
                self.study.enqueue_trial(point)
            trial = self.study.ask()
            if self._surplus(trial):
                return
            if grid and self._duplicate(trial):
                continue
            # TPE samples at suggest time: seeded now, from the number the storage gave
            seed = derived_seed(self.context.base.seed, self.method, trial.number) % 2**32
            self.study.sampler = tpe_sampler(self.context.options, seed)
            self._run_trial(trial)

    def _next_grid_point(self, trials: list[Any]) -> dict[str, Any] | None:
        """The first grid point (in the seeded order) that no trial has, except those that were
        retried (their settings are enqueued again) or given up as surplus: a point that failed
        is not tried again."""
        taken = [_point(t) for t in trials if not _given_back(t)]
        space = self.context.spaces[self.method]
        for point in grid_order(space, self.context.base.seed):
            if point not in taken:
                return point
        return None

    def _duplicate(self, trial: Any) -> bool:
        """With ``grid``, two workers can enqueue the same point at once, or one can take the
        other's: a trial without a grid point, or whose point an earlier trial has, is given
        up (marked surplus) and the worker asks again."""
        trials = self.study.get_trials(deepcopy=False)
        point = next(t for t in trials if t.number == trial.number).system_attrs.get("fixed_params")
        earlier = [_point(t) for t in trials if t.number < trial.number and not _given_back(t)]
        if point is not None and point not in earlier:
            return False
        states = require_optuna().trial.TrialState
        trial.set_user_attr("surplus", True)
        self.study.tell(trial, state=states.FAIL)
        return True

    def _surplus(self, trial: Any) -> bool:
        """Another process started the last needed trial at the same time: give this one up."""
        optuna = require_optuna()
        states = optuna.trial.TrialState
        counted = (states.COMPLETE, states.PRUNED, states.RUNNING)
        before = [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.number < trial.number and t.state in counted
        ]
        if len(before) < self.target:
            return False
        trial.set_user_attr("surplus", True)
        self.study.tell(trial, state=states.FAIL)
        return True

    def _run_trial(self, trial: Any) -> None:
        outcome = run_trial(self.context, self.method, self.study, trial)
        if outcome.state == "FAIL" and not outcome.interrupted:
            self.fails_in_a_row += 1
            if self.fails_in_a_row >= _FAILS_IN_A_ROW and not self._any_finished():
                raise ValueError(
                    f"tune {self.method}: {self.fails_in_a_row} trials failed in a row and none "
                    f"finished; the last: {outcome.message}"
                )
        else:
            self.fails_in_a_row = 0
        self._log_progress(outcome)

    def _any_finished(self) -> bool:
        states = require_optuna().trial.TrialState
        return any(
            t.state in (states.COMPLETE, states.PRUNED)
            for t in self.study.get_trials(deepcopy=False)
        )

    def _log_progress(self, outcome: Any) -> None:
        """One line per trial: how it ended, the study's count and best, and an ETA from this
        process's mean trial time (the trials left, over ``jobs`` processes)."""
        states = require_optuna().trial.TrialState
        trials = self.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
        done = len(trials)
        self.seconds.append(outcome.seconds)
        mean = sum(self.seconds) / len(self.seconds)
        left = max(0, self.target - done) + self.methods_after * self.target
        eta = mean * left / self.context.options.jobs
        try:
            best = f"{100 * self.study.best_value:.2f} %"
        except ValueError:
            best = "-"
        logger.info(
            "tune %s: trial %d %s (%s) in %.0f s; %d/%d finished; best val %s; ETA %s",
            self.method, outcome.number, outcome.state.lower(), outcome.message,
            outcome.seconds, done, self.target, best, _duration(eta),
        )  # fmt: skip


def _point(trial: Any) -> dict[str, Any]:
    """A trial's settings: sampled, or fixed when it was enqueued and has not started."""
    return dict(trial.params or trial.system_attrs.get("fixed_params", {}))


def _given_back(trial: Any) -> bool:
    """A failed trial whose settings were enqueued again, or one given up as surplus."""
    attrs = trial.user_attrs
    return trial.state.name == "FAIL" and bool(attrs.get("retried") or attrs.get("surplus"))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def fail_stale_trials(study: Any) -> list[int]:
    """Mark RUNNING trials whose process died as failed and enqueue their settings again.

    A trial is stale when its process ran on this machine and is gone, or when its heartbeat
    (see :data:`HEARTBEAT_S`) is older than :data:`GRACE_S`. Returns the numbers marked.
    """
    optuna = require_optuna()
    states = optuna.trial.TrialState
    host, now, marked = socket.gethostname(), time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        attrs = trial.user_attrs
        beat = attrs.get("heartbeat")
        if beat is None and trial.datetime_start is not None:  # died before its first beat
            beat = trial.datetime_start.timestamp()
        same_host = attrs.get("host") == host and isinstance(attrs.get("pid"), int)
        dead = same_host and attrs["pid"] != os.getpid() and not _pid_alive(attrs["pid"])
        silent = isinstance(beat, (int, float)) and now - beat > GRACE_S
        if not (dead or silent):
            continue
        why = f"its process ({attrs.get('pid')} on {attrs.get('host')}) ended mid-trial; retried"
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "error", why)
            study._storage.set_trial_user_attr(trial._trial_id, "retried", True)
            study.tell(trial.number, state=states.FAIL)
        except (RuntimeError, ValueError):  # another process marked it first
            continue
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        logger.warning("tune: trial %d %s", trial.number, why)
        marked.append(trial.number)
    return marked


class Heartbeat:
    """Writes ``heartbeat`` (the time) to a running trial every :data:`HEARTBEAT_S` seconds."""

    def __init__(self, study: Any, trial: Any) -> None:
        self._stop = threading.Event()
        self._study, self._trial_id = study, trial._trial_id
        self._thread = threading.Thread(
            target=self._beat, name="deltaft-tune-heartbeat", daemon=True
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._study._storage.set_trial_user_attr(self._trial_id, "heartbeat", time.time())
            except Exception as error:  # a busy database: the next beat tries again
                logger.debug("tune: heartbeat of trial %d not written: %s", self._trial_id, error)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended: ``state`` (``COMPLETE``, ``PRUNED``, ``FAIL``) and a short message."""

    number: int
    state: str
    message: str
    seconds: float
    interrupted: bool = False


def _message(error: Exception) -> str:
    """One line: a setting error as the command line shows it, a known failure by its message,
    anything else with its type (``LinAlgError: ...``)."""
    if isinstance(error, SettingError):
        text = error.render(lambda key: key)
    elif isinstance(error, (ValueError, NonFiniteLossError)):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def _abandoned(trial: Any, seconds: float) -> TrialOutcome:
    message = "abandoned: another process declared it dead (late heartbeat) and retries it"
    logger.warning("tune: trial %d %s", trial.number, message)
    return TrialOutcome(trial.number, "FAIL", message, seconds, interrupted=True)


def _suggest(trial: Any, param: Param) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.name, list(param.choices))
    assert param.low is not None and param.high is not None  # a range without choices
    if param.integer:
        return trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, log=param.log)


def run_trial(context: TuneContext, method: str, study: Any, trial: Any) -> TrialOutcome:
    """Train ``trial``'s settings on validation only; tell the study how it ended.

    Pruned from its per-epoch validation accuracy (never after its last epoch: nothing would
    be saved). Any error (a setting that cannot work, a diverged loss, an SVD that does not
    converge, CUDA out-of-memory, an unreadable image...) is a failed trial with its message, and
    the study goes on; Ctrl-C marks it failed, enqueues its settings again (the next run retries
    them) and propagates. A trial that another process declared dead meanwhile (its heartbeat
    was late) is left to the retry: this process stops it quietly.
    """

    from deltaft.app.train import run_training

    optuna = require_optuna()
    states = optuna.trial.TrialState
    started = time.perf_counter()
    for key, value in (
        ("host", socket.gethostname()),
        ("pid", os.getpid()),
        ("heartbeat", time.time()),
    ):
        trial.set_user_attr(key, value)
    space = context.spaces[method]
    params = {name: _suggest(trial, param) for name, param in space.items()}
    out = context.out / "trials" / method / str(trial.number)
    trial.set_user_attr("out", str(out))

    finished_elsewhere = optuna.exceptions.UpdateFinishedTrialError

    def on_epoch(row: dict[str, Any]) -> None:
        accuracy = row.get("val/acc")
        if accuracy is None:
            return
        trial.report(float(accuracy), int(row["epoch"]))
        if row["epoch"] < row["epochs"] and trial.should_prune():  # at the end: nothing to save
            raise optuna.TrialPruned(
                f"pruned after epoch {row['epoch']} at val {100 * accuracy:.2f} %"
            )

    def ended(state: Any, message: str, value: float | None = None, **extra: Any) -> TrialOutcome:
        seconds = time.perf_counter() - started
        try:
            trial.set_user_attr("seconds", seconds)
            if state == states.FAIL:
                trial.set_user_attr("error", message)
            study.tell(trial, value if state == states.COMPLETE else None, state=state)
        except finished_elsewhere:
            return _abandoned(trial, seconds)
        return TrialOutcome(trial.number, state.name, message, seconds, **extra)

    progress = context.progress if context.options.jobs == 1 else None
    with Heartbeat(study, trial):
        try:
            cfg = trial_config(context.base, method, params, out)
            attention = context.attention_for(method)
            if attention is not None:
                cfg = dataclasses.replace(cfg, attention=attention)
            summary = run_training(cfg, progress=progress, test=False, on_epoch=on_epoch)
        except optuna.TrialPruned as pruned:
            return ended(states.PRUNED, str(pruned))
        except finished_elsewhere:  # trial.report: another process failed it and retries it
            return _abandoned(trial, time.perf_counter() - started)
        except KeyboardInterrupt:
            trial.set_user_attr("retried", True)
            ended(states.FAIL, "interrupted; retried by the next run", interrupted=True)
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            raise
        except Exception as error:
            message = _message(error)
            logger.warning("tune %s: trial %d failed: %s", method, trial.number, message)
            return ended(states.FAIL, message)
    accuracy = summary["val_accuracy"]
    trial.set_user_attr("best_val_accuracy", summary["best_val_accuracy"])
    trial.set_user_attr("epochs", summary["epochs"])
    return ended(states.COMPLETE, f"val {100 * accuracy:.2f} %", float(accuracy))
