"""Run several methods on the same data and seeds and tabulate their accuracy.

``deltaft compare --methods l2,l2sp,delta --seeds 3 --out DIR ...`` trains every method with every
seed, each run in its own folder ``DIR/<method>-seed<seed>`` (a normal ``deltaft train`` run
folder), then writes ``DIR/compare.md`` (markdown table), ``DIR/compare.json`` (every number) and
``DIR/compare.png`` (bar chart). A run whose ``summary.json`` exists is reused, not re-run, so an
interrupted comparison continues where it stopped and adding a method or a seed only trains what is
new.

The results (:class:`RunResult`, :class:`CompareRow`, :class:`CompareResult`: tables, JSON and
plot) are defined in :mod:`deltaft.app.results` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaft.app.checks import outside_data
from deltaft.app.config_io import read_settings_file
from deltaft.app.errors import SettingError, literal
from deltaft.app.jobs import job_pool
from deltaft.app.methods import BASE_METHODS, MethodSpec, for_method, spec_help
from deltaft.app.recipes import check_wise_validation
from deltaft.app.results import CompareResult, CompareRow, RunResult
from deltaft.app.tracking import RunDir

if TYPE_CHECKING:
    from deltaft.app.config import TrainConfig
    from deltaft.engine import ProgressFn

__all__ = [
    "COMPARE_METHODS",
    "CompareResult",
    "CompareRow",
    "RunResult",
    "parse_methods",
    "parse_seeds",
    "run_compare",
]

logger = logging.getLogger(__name__)

SCRATCH = "scratch"
# Every base method, plus "scratch": method l2 from randomly initialised weights. Any method
# spec (``delta+lpft+wise``) is accepted too.
COMPARE_METHODS: tuple[str, ...] = (*BASE_METHODS, SCRATCH)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Validate a comma-separated list (or a sequence) of method specs to compare.

    Each is a method spec (:class:`~deltaft.app.methods.MethodSpec`, written back in canonical
    order) or ``scratch`` (``l2`` from random weights).

    Raises:
        ValueError: empty, unknown or repeated names.

    Example:
        >>> parse_methods("l2, delta+wise+lpft,scratch")
        ['l2', 'delta+lpft+wise', 'scratch']
    """
    names = text.split(",") if isinstance(text, str) else list(text)
    methods = []
    for name in (name.strip() for name in names):
        if name.lower() == SCRATCH:
            methods.append(SCRATCH)
        elif name:
            try:
                methods.append(str(MethodSpec.parse(name)))
            except ValueError as error:
                raise ValueError(
                    f"{error} In a comparison, each comma-separated entry is such a spec or "
                    "'scratch' (l2 from random weights)."
                ) from None
    if not methods:
        raise ValueError(
            f"No method in {text!r}: expected a comma-separated list of specs, each "
            f"{spec_help()}, or 'scratch'; e.g. l2,l2sp,delta."
        )
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"Method(s) {', '.join(repeated)} given more than once in {text!r}.")
    return methods


def parse_seeds(value: str | int | Sequence[int]) -> list[int]:
    """Seeds from a count ``N`` (seeds ``0 .. N-1``) or an explicit comma-separated list.

    A single number is a count: ``"3"`` means seeds 0, 1, 2; write ``"3,"`` for seed 3 alone.

    Raises:
        ValueError: a count below 1, a non-integer or a repeated seed.

    Example:
        >>> parse_seeds("3"), parse_seeds("0,7,42"), parse_seeds(2)
        ([0, 1, 2], [0, 7, 42], [0, 1])
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [int(p) for p in parts if p]
        except ValueError:
            raise ValueError(
                f"Seeds must be a count N (seeds 0..N-1) or a comma-separated list of integers, "
                f"got {value!r}; e.g. 3 or 0,1,2."
            ) from None
        value = numbers[0] if "," not in value and len(numbers) == 1 else numbers
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"The number of seeds must be >= 1, got {value}.")
        return list(range(value))
    seeds = [int(s) for s in value]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Seeds must be a non-empty list of distinct integers, got {seeds}.")
    return seeds


def _run_config(base: TrainConfig, method: str, seed: int, run_dir: Path) -> TrainConfig:
    """``base`` with the method, seed and output folder of one run.

    ``scratch`` is ``l2`` with ``weights="none"``. The settings a method does not use return to
    their defaults (:func:`~deltaft.app.methods.for_method`): ``layers`` for ``l2``, ``bss_eta``
    without ``+bss``...

    Raises:
        SettingError: a ``+wise`` spec on data without validation.
    """
    trained = "l2" if method == SCRATCH else method
    changes: dict[str, Any] = {"seed": seed, "out": str(run_dir), "resume": False}
    if method == SCRATCH:
        changes["weights"] = "none"
    cfg = for_method(base, trained, **changes)
    check_wise_validation(cfg)
    return cfg


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Cannot reuse {path}: {error}. Delete its run folder to train that run again."
        ) from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a run summary (a JSON object); delete its run folder.")
    return summary


def _check_reusable(summary: Mapping[str, Any], cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a finished run that was trained with other settings than this comparison's.

    The summary's method and seed must match, and so must every setting of the run's stored
    configuration (the summary's ``config``, else ``config.yaml``), runtime settings such as
    ``device`` or ``workers`` aside (:data:`deltaft.app.config.RUNTIME_KEYS`).
    """
    for key in ("method", "seed"):
        want, got = getattr(cfg, key), summary.get(key)
        if got is not None and got != want:
            raise SettingError(
                f"{literal(run_dir)} holds a run with {key} {literal(repr(got))}, but this "
                f"comparison needs {key} {literal(repr(want))} there; use another {{out}} folder "
                "or delete that run folder."
            )
    stored = summary.get("config")
    stored_path = run_dir / "config.yaml"
    if not isinstance(stored, dict) and stored_path.is_file():
        try:
            stored = read_settings_file(stored_path)  # bounded, duplicate keys refused
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot read {stored_path} ({error}) to check that the run can be reused; "
                "delete that run folder to train it again."
            ) from error
    differences = cfg.differences(stored) if isinstance(stored, dict) else {}
    if differences:
        listed = ", ".join(
            f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differences.items()
        )
        raise SettingError(
            f"{literal(run_dir)} holds a finished run with other settings ({literal(listed)}); "
            "use another {out} folder for these settings, or delete that run folder to train it "
            "again."
        )


def _with_tuned(
    plan: list[tuple[str, int, TrainConfig]], tuned: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, int, TrainConfig]]:
    """Each run's config with its method's tuned settings; every method must have them."""
    missing = sorted({method for method, _, _ in plan if method not in tuned})
    if missing:
        raise SettingError(
            f"{{methods}} {literal(', '.join(missing))} were not tuned there (tuned: "
            f"{literal(', '.join(tuned))}); compare the tuned methods, or tune these first."
        )
    return [(m, s, dataclasses.replace(cfg, **tuned[m])) for m, s, cfg in plan]


def _tuned_note(
    methods: Sequence[str], tuned: Mapping[str, Mapping[str, Any]], tuned_from: str | None
) -> str:
    """The line under a ``--tuned`` table: the settings came from validation."""
    where = f" ({tuned_from})" if tuned_from else ""
    settings = "; ".join(
        f"{m}: "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned[m].items()
        )
        for m in methods
    )
    return (
        f"Each method ran with its own settings, chosen on the validation split by deltaft "
        f"tune{where}; the test split was read only here. {settings}."
    )


def _job_train(job: tuple[int, TrainConfig]) -> tuple[int, dict[str, Any]]:
    from deltaft.app.train import run_training

    index, cfg = job
    return index, run_training(cfg)


def _train_in_jobs(
    todo: Sequence[tuple[str, int, TrainConfig]],
    jobs: int,
    done: dict[tuple[str, int], RunResult],
    total: int,
) -> None:
    """Train ``todo`` in ``jobs`` processes at once, adding each finished run to ``done``."""
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    logger.info("compare: %d runs, %d at once, %d torch thread(s) each", len(todo), jobs, threads)
    interrupted = (
        "interrupted; the finished runs are kept, and the same command continues the others "
        "from their last finished epoch."
    )
    with job_pool(min(jobs, len(todo)), threads, interrupted) as pool:
        jobs_in_order = [(index, cfg) for index, (_, _, cfg) in enumerate(todo)]
        for index, summary in pool.imap_unordered(_job_train, jobs_in_order):
            method, seed, cfg = todo[index]
            run = RunResult.from_summary(method, seed, summary, Path(cfg.out), reused=False)
            done[(method, seed)] = run
            logger.info(
                "compare %d/%d: %s, seed %d: %.2f %% (%s) in %.0f s -> %s",
                len(done), total, method, seed, run.accuracy, run.split, run.seconds, run.run_dir,
            )  # fmt: skip


def run_compare(
    base: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int] | int,
    out: str | Path,
    *,
    progress: ProgressFn | None = None,
    jobs: int = 1,
    tuned: Mapping[str, Mapping[str, Any]] | None = None,
    tuned_from: str | None = None,
) -> CompareResult:
    """Train every method with every seed on the same data and tabulate the accuracies.

    Run ``(m, s)`` is :func:`deltaft.app.train.run_training` of ``base`` with method ``m``,
    seed ``s``
    and output folder ``out / f"{m}-seed{s}"``; ``scratch`` is method ``l2`` with
    ``weights="none"``. Everything else (data, model, subsampling, schedule, alpha, beta...) comes
    from ``base``, so with the same seed every method sees the same data split and sample; ``delta``
    estimates its attention inside each run. ``layers`` is dropped for methods other than ``fm``
    and ``delta``, ``attention`` (a file to reuse) for methods other than ``delta``. Every run's
    configuration is built, and so validated, before the first run trains. The accuracy is each
    summary's ``test_accuracy`` (last epoch), or its ``val_accuracy`` when the data has no test
    split.

    Nothing is trained twice or overwritten: a run whose ``summary.json`` exists is reused (and
    logged), after checking that its method, seed and settings are this comparison's; a run
    folder without a summary (an interrupted run) is continued with ``resume=True`` from its last
    checkpoint. So an interrupted comparison continues where it stopped, and adding a method or
    a seed trains only the new runs. At the end ``compare.md``, ``compare.json`` and
    ``compare.png`` are written into ``out``.

    Args:
        base: the training configuration shared by every run.
        methods: names from :data:`COMPARE_METHODS`, e.g. ``["l2", "l2sp", "delta"]``.
        seeds: the seeds, or a count ``N`` for seeds ``0 .. N-1``.
        out: the comparison folder.
        progress: passed on to :func:`~deltaft.app.train.run_training` (``jobs=1`` only).
        jobs: runs trained at once, each in its own process (``spawn``) with
            ``max(1, torch.get_num_threads() // jobs)`` torch threads, so that two jobs on two
            cores do not fight over them. A run gives the same result in a job as in-process
            with that thread count. Each finished run is logged in one line; warnings still
            show (each job sends its log records to this process's ``deltaft`` loggers).
            Ctrl-C (SIGTERM and SIGHUP on the command line) stops every job, and so does
            this process's death (SIGKILL included): no job outlives it. The next call
            continues the unfinished runs.
        tuned: each method's own settings (``deltaft tune``'s best on validation, see
            :func:`deltaft.app.tune_report.load_tuned`), applied over ``base``; every method
            must have an entry. The table says where they came from (``tuned_from``).
        tuned_from: the tune folder, named under the table.

    Returns:
        A :class:`CompareResult`; ``result.table_markdown()`` is the table.

    Raises:
        ValueError: an unknown or repeated method, bad seeds or settings (a
            :class:`~deltaft.app.errors.SettingError`), an ``out`` inside the data folder or
            holding a training run, or a finished run in ``out`` trained with another method,
            seed or settings.
    """
    from deltaft.app.train import run_training

    methods = parse_methods(methods)
    seed_list = parse_seeds(seeds)
    out = Path(out)
    outside_data(out, base.data)
    if RunDir(out).holds_run():
        raise SettingError(
            f"{{out}} {literal(out)} holds a training run (config.yaml, checkpoints...), not a "
            "comparison; choose another {out} (compare writes one run folder per method and "
            "seed into it)."
        )
    # Every run's settings are built (and validated) before the first one trains.
    plan = [
        (method, seed, _run_config(base, method, seed, out / f"{method}-seed{seed}"))
        for method in methods
        for seed in seed_list
    ]
    if tuned is not None:
        plan = _with_tuned(plan, tuned)
    if jobs < 1:
        raise SettingError(f"{{jobs}} must be >= 1, got {jobs}.")
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], RunResult] = {}
    todo: list[tuple[str, int, TrainConfig]] = []
    for index, (method, seed, cfg) in enumerate(plan, start=1):
        run_dir = Path(cfg.out)
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = _read_summary(summary_path)
            _check_reusable(summary, cfg, run_dir)
            logger.info("compare %d/%d: reusing finished run %s", index, len(plan), run_dir)
            done[(method, seed)] = RunResult.from_summary(
                method, seed, summary, run_dir, reused=True
            )
            continue
        if RunDir(run_dir).holds_run():  # interrupted: continue from its last checkpoint
            cfg = dataclasses.replace(cfg, resume=True)
        todo.append((method, seed, cfg))
    if jobs == 1 or len(todo) <= 1:
        for method, seed, cfg in todo:
            action = "continuing interrupted run" if cfg.resume else f"{method}, seed {seed} ->"
            logger.info("compare %d/%d: %s %s", len(done) + 1, len(plan), action, cfg.out)
            summary = run_training(cfg, progress=progress)
            done[(method, seed)] = RunResult.from_summary(
                method, seed, summary, Path(cfg.out), reused=False
            )
    else:
        _train_in_jobs(todo, jobs, done, len(plan))
    runs = {method: [done[(method, seed)] for seed in seed_list] for method in methods}
    rows = [CompareRow(method, tuple(method_runs)) for method, method_runs in runs.items()]
    note = None if tuned is None else _tuned_note(methods, tuned, tuned_from)
    result = CompareResult(rows=rows, seeds=seed_list, out=out, settings_note=note)
    files = {name: path for name, path in result.write().items() if path is not None}
    logger.info("compare: wrote %s", ", ".join(str(p) for p in files.values()))
    return dataclasses.replace(result, files=files)
