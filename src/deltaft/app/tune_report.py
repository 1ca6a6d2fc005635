"""Results of ``deltaft tune``: ``tune.md``, ``tune.json``, ``best/<method>.yaml``, figures.

Per method: the best trial's validation accuracy and settings, and how many trials completed,
were pruned or failed (each failure with its message in ``tune.json``). ``best/<method>.yaml``
is the base configuration with the best settings, a file for ``deltaft train --config``;
``deltaft compare --tuned OUT`` reads ``tune.json`` (:func:`load_tuned`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaft._utils import atomic_write
from deltaft.app.config import TrainConfig
from deltaft.app.tune_space import Param
from deltaft.app.tune_study import TuneOptions, require_optuna, study_name, trial_config

__all__ = [
    "MethodTuning",
    "TuneResult",
    "load_tuned",
    "plot_tuning",
    "summarize_study",
    "tuned_base",
    "write_results",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodTuning:
    """One method's study, summarized.

    Attributes:
        method: the method spec.
        best_value: the best trial's last-epoch validation accuracy (fraction), ``None``
            when no trial completed.
        best_params: the best trial's settings.
        best_trial: its number; ``best_out`` its run folder.
        complete, pruned, failed, retried: trial counts; ``retried``: trials that were
            interrupted or whose process died, their settings run again by a later trial.
        trials: every trial: ``number``, ``state``, ``value``, ``params``, ``seconds``,
            ``error``, ``epochs`` (reported validation accuracies, by epoch).
    """

    method: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_out: str | None
    complete: int
    pruned: int
    failed: int
    retried: int
    space: list[str]
    trials: list[dict[str, Any]] = field(repr=False)

    @property
    def epochs_saved(self) -> tuple[int, int]:
        """``(epochs pruning saved, epochs trained)``: a pruned trial saved the epochs a
        complete trial of this study trained beyond its last reported one."""
        full = max((len(t["epochs"]) for t in self.trials if t["state"] == "COMPLETE"), default=0)
        pruned = [len(t["epochs"]) for t in self.trials if t["state"] == "PRUNED"]
        trained = sum(len(t["epochs"]) for t in self.trials)
        return sum(max(0, full - n) for n in pruned), trained

    def to_dict(self) -> dict[str, Any]:
        """Everything in ``tune.json`` for this method."""
        return {
            "method": self.method,
            "best_val_accuracy": self.best_value,
            "best_params": self.best_params,
            "best_trial": self.best_trial,
            "best_out": self.best_out,
            "complete": self.complete,
            "pruned": self.pruned,
            "failed": self.failed,
            "retried": self.retried,
            "space": self.space,
            "epochs_saved_by_pruning": self.epochs_saved[0],
            "epochs_trained": self.epochs_saved[1],
            "trials": self.trials,
        }


@dataclass(frozen=True)
class TuneResult:
    """The outcome of :func:`~deltaft.app.tune.run_tune`: a row per method and the files."""

    methods: list[MethodTuning]
    out: Path
    files: dict[str, Path] = field(default_factory=dict)

    def table_markdown(self) -> str:
        """One row per method: best validation accuracy, its settings, trial counts."""
        lines = [
            "| method | best val accuracy (%) | best settings | complete | pruned | failed | "
            "retried |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for row in self.methods:
            value = "-" if row.best_value is None else f"{100 * row.best_value:.2f}"
            settings = ", ".join(f"{k}={_fmt(v)}" for k, v in row.best_params.items()) or "-"
            lines.append(
                f"| {row.method} | {value} | {settings} | {row.complete} | {row.pruned} | "
                f"{row.failed} | {row.retried} |"
            )
        saved = [row.epochs_saved for row in self.methods]
        lines += [
            "",
            f"Pruning saved {sum(s for s, _ in saved)} epochs; {sum(t for _, t in saved)} were "
            "trained.",
            "",
            "Validation accuracy of the last epoch; the test split was not read. Each method had "
            "its own search space:",
            "",
            *(f"- {row.method}: {'; '.join(row.space)}" for row in self.methods),
        ]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _trial_row(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": dict(trial.params),
        "seconds": attrs.get("seconds"),
        "error": attrs.get("error"),
        "epochs": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "out": attrs.get("out"),
    }


def summarize_study(study: Any, method: str, space: Mapping[str, Param]) -> MethodTuning:
    """A :class:`MethodTuning` from a study (surplus trials, given up unstarted, left out)."""
    optuna = require_optuna()
    states = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    complete = [t for t in trials if t.state == states.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return MethodTuning(
        method=method,
        best_value=None if best is None else float(best.value),
        best_params={} if best is None else dict(best.params),
        best_trial=None if best is None else best.number,
        best_out=None if best is None else best.user_attrs.get("out"),
        complete=len(complete),
        pruned=sum(t.state == states.PRUNED for t in trials),
        failed=sum(t.state == states.FAIL and not t.user_attrs.get("retried") for t in trials),
        retried=sum(t.state == states.FAIL and bool(t.user_attrs.get("retried")) for t in trials),
        space=[p.describe() for p in space.values()],
        trials=[_trial_row(t) for t in trials],
    )


def _prune_folders(out: Path, rows: Sequence[MethodTuning], keep: str) -> None:
    """Remove trial run folders as ``keep`` says (``best``: all but each method's best).

    Only folders of ended trials: a trial another process is running keeps its folder.
    """
    if keep == "all":
        return
    for row in rows:
        ended = {
            str(t["number"]) for t in row.trials if t["state"] in ("COMPLETE", "PRUNED", "FAIL")
        }
        folder = out / "trials" / row.method
        if not folder.is_dir():
            continue
        for trial_dir in folder.iterdir():
            if trial_dir.name not in ended:
                continue
            if keep == "best" and trial_dir.name == str(row.best_trial):
                continue
            shutil.rmtree(trial_dir, ignore_errors=True)


def write_results(
    base: TrainConfig,
    methods: Sequence[str],
    spaces: Mapping[str, Mapping[str, Param]],
    out: Path,
    options: TuneOptions,
    storage: Any,
) -> TuneResult:
    """Summarize each method's study and write ``tune.md``, ``tune.json``, ``best/*.yaml`` and
    the figures into ``out``; remove trial folders as ``options.keep_trials`` says."""
    optuna = require_optuna()
    rows = []
    for method in methods:
        study = optuna.load_study(study_name=study_name(method), storage=storage)
        rows.append(summarize_study(study, method, spaces[method]))
    files: dict[str, Path] = {}
    best_dir = out / "best"
    for row in rows:
        if row.best_trial is None:
            logger.warning("tune %s: no trial completed; no best settings.", row.method)
            continue
        cfg = trial_config(base, row.method, row.best_params, out / "runs" / row.method)
        path = best_dir / f"{row.method}.yaml"
        best_dir.mkdir(parents=True, exist_ok=True)
        header = f"# deltaft tune: {row.method}'s best settings on validation\n"
        _write_text(path, header + cfg.to_yaml())
        files[f"best/{row.method}"] = path
    result = TuneResult(rows, out)
    markdown = out / "tune.md"
    text = "# deltaft tune\n\n" + result.table_markdown()
    _write_text(markdown, text)
    payload = {
        "base": base.to_dict(),
        "trials_per_method": options.trials,
        "sampler": options.sampler,
        "pruner": options.pruner,
        "methods": {row.method: row.to_dict() for row in rows},
    }
    summary = out / "tune.json"
    _write_text(summary, json.dumps(payload, indent=2) + "\n")
    files.update(markdown=markdown, json=summary)
    for name, path in plot_tuning(rows, out).items():
        files[name] = path
    _prune_folders(out, rows, options.keep_trials)
    return TuneResult(rows, out, files)


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda handle: handle.write(data))


def tuned_base(folder: str | Path) -> dict[str, Any]:
    """The base settings a tune folder's studies ran with (``tune.json``), less ``out``,
    ``method`` and ``resume``: the lowest source of ``compare --tuned``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_tuned`.
    """
    load_tuned(folder)  # the same checks and messages
    base = json.loads((Path(folder) / "tune.json").read_text()).get("base")
    if not isinstance(base, dict):
        raise ValueError(f"{Path(folder) / 'tune.json'} has no base settings; tune again.")
    return {k: v for k, v in base.items() if k not in ("out", "method", "resume")}


def load_tuned(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{method: best settings}`` from a tune folder's ``tune.json``.

    Raises:
        FileNotFoundError: no ``tune.json`` there.
        ValueError: an unreadable file, or a method without a completed trial.
    """
    path = Path(folder) / "tune.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --tuned takes the --out folder of a finished `deltaft tune`."
        )
    try:
        methods = json.loads(path.read_text())["methods"]
        tuned = {m: dict(row["best_params"]) for m, row in methods.items()}
        empty = [m for m, row in methods.items() if row["best_trial"] is None]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"Cannot read {path}: {error!r}; run `deltaft tune` again.") from None
    if empty:
        raise ValueError(
            f"{path}: no trial of {', '.join(empty)} completed, so there are no best settings; "
            "tune again with more --trials or leave those methods out."
        )
    return tuned


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def plot_tuning(rows: Sequence[MethodTuning], out: Path) -> dict[str, Path]:
    """``tune_history.png`` (validation accuracy by trial, best so far) and
    ``tune_sensitivity.png`` (validation accuracy against ``lr`` and ``alpha``); none without
    matplotlib."""
    from deltaft.app.plots import new_figure, save_figure, warn_no_matplotlib

    made = new_figure(len(rows), "validation accuracy by trial")
    if made is None:
        warn_no_matplotlib("tune figures")
        return {}
    fig, axes = made
    for ax, row in zip(axes, rows, strict=True):
        points = [(t["number"], t["value"]) for t in row.trials if t["state"] == "COMPLETE"]
        pruned = [
            (t["number"], list(t["epochs"].values())[-1])
            for t in row.trials
            if t["state"] == "PRUNED" and t["epochs"]
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            best = [max(ys[: i + 1]) for i in range(len(ys))]
            ax.plot(xs, [100 * y for y in ys], "o", label="complete")
            ax.step(xs, [100 * b for b in best], where="post", label="best so far")
        if pruned:
            xs, ys = zip(*pruned, strict=True)
            ax.plot(xs, [100 * y for y in ys], "x", color="grey", label="pruned (last epoch)")
        ax.set(title=row.method, xlabel="trial", ylabel="val accuracy (%)")
        ax.legend(fontsize="small")
    files = {"history": save_figure(fig, out / "tune_history.png")}
    panels = [(row, name) for row in rows for name in ("lr", "alpha") if _tuned(row, name)]
    made = new_figure(len(panels), "sensitivity: validation accuracy against a setting")
    if made is not None and panels:
        fig, axes = made
        for ax, (row, name) in zip(axes, panels, strict=True):
            done = [t for t in row.trials if t["state"] == "COMPLETE" and name in t["params"]]
            ax.plot([t["params"][name] for t in done], [100 * t["value"] for t in done], "o")
            values = [t["params"][name] for t in done]
            if values and min(values) > 0 and max(values) / min(values) > 10:
                ax.set_xscale("log")
            ax.set(title=row.method, xlabel=name, ylabel="val accuracy (%)")
        files["sensitivity"] = save_figure(fig, out / "tune_sensitivity.png")
    return files


def _tuned(row: MethodTuning, name: str) -> bool:
    return any(
        name in t["params"] and t["state"] == "COMPLETE" and _finite(t["value"]) for t in row.trials
    )


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)
