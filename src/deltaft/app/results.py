"""The results of a comparison: one run, one method's runs, and the table, JSON and plot of all.

:func:`deltaft.app.compare.run_compare` returns a :class:`CompareResult` and writes it with
:meth:`CompareResult.write`: ``compare.md`` (markdown tables), ``compare.json`` (every number) and
``compare.png`` (bar chart).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaft.app.errors import SettingError, literal
from deltaft.app.plots import plot_compare

__all__ = ["CompareResult", "CompareRow", "RunResult"]

# The splits a run's accuracy is read from, in order of preference.
_SPLITS = ("test", "val")


@dataclass(frozen=True)
class RunResult:
    """One training run of a comparison.

    Attributes:
        method: the compared method's name (``scratch`` included).
        seed: the run's seed.
        accuracy: accuracy in percent on ``split``.
        split: ``"test"``, or ``"val"`` when the data has no test split.
        seconds: the run's wall-clock time, from its summary.
        run_dir: the run folder.
        reused: whether the run was found finished on disk instead of trained now.
    """

    method: str
    seed: int
    accuracy: float
    split: str
    seconds: float
    run_dir: Path
    reused: bool = False

    @classmethod
    def from_summary(
        cls, method: str, seed: int, summary: Mapping[str, Any], run_dir: Path, *, reused: bool
    ) -> RunResult:
        """The run whose ``summary.json`` is ``summary``.

        ``accuracy`` is ``100 * summary["test_accuracy"]``, or ``100 * summary["val_accuracy"]``
        when the data has no test split; ``seconds`` is ``summary["seconds"]`` (0 when absent).

        Raises:
            SettingError: the summary has neither accuracy (the data has no test or val split).
        """
        for split in _SPLITS:
            accuracy = summary.get(f"{split}_accuracy")
            if accuracy is not None:
                break
        else:
            raise SettingError(
                f"The run in {literal(run_dir)} reports neither a test nor a validation accuracy; "
                "give the data a test/ or val/ folder, or a validation split ({val_split})."
            )
        return cls(
            method=method,
            seed=seed,
            accuracy=100.0 * float(accuracy),
            split=split,
            seconds=float(summary.get("seconds") or 0.0),
            run_dir=run_dir,
            reused=reused,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``run_dir`` as a string)."""
        return {**dataclasses.asdict(self), "run_dir": str(self.run_dir)}


@dataclass(frozen=True)
class CompareRow:
    """All runs of one method, in seed order.

    Attributes:
        method: the compared method's name.
        runs: its runs.
    """

    method: str
    runs: tuple[RunResult, ...]

    @property
    def accuracies(self) -> list[float]:
        """Accuracy of each run, in percent."""
        return [run.accuracy for run in self.runs]

    @property
    def n(self) -> int:
        """Number of runs."""
        return len(self.runs)

    @property
    def mean(self) -> float:
        """Mean accuracy in percent (NaN without runs)."""
        return statistics.fmean(self.accuracies) if self.runs else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (``ddof=1``) of the accuracy in percent; 0 for one run."""
        return statistics.stdev(self.accuracies) if self.n > 1 else 0.0

    @property
    def seconds(self) -> float:
        """Mean wall-clock seconds per run (NaN without runs)."""
        return statistics.fmean(run.seconds for run in self.runs) if self.runs else math.nan

    @property
    def split(self) -> str:
        """The evaluated split: ``"test"``, ``"val"``, or ``"test+val"`` when runs differ."""
        return "+".join(s for s in _SPLITS if any(run.split == s for run in self.runs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary of the row, without the runs."""
        return {
            "method": self.method,
            "split": self.split,
            "n": self.n,
            "accuracy_mean": self.mean,
            "accuracy_std": self.std,
            "accuracies": self.accuracies,
            "seeds": [run.seed for run in self.runs],
            "seconds_per_run": self.seconds,
        }


@dataclass(frozen=True)
class CompareResult:
    """The outcome of :func:`run_compare`.

    Attributes:
        rows: one :class:`CompareRow` per method, in the order the methods were given.
        seeds: the seeds every method ran with.
        out: the comparison folder.
        files: what :meth:`write` wrote (``markdown``, ``json``, ``plot``), once it has run.
    """

    rows: list[CompareRow]
    seeds: list[int]
    out: Path
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    # compare --tuned: where each method's settings came from, said under the table.
    settings_note: str | None = None

    @property
    def runs(self) -> list[RunResult]:
        """Every run, method by method."""
        return [run for row in self.rows for run in row.runs]

    def table_markdown(self) -> str:
        """The markdown table, one row per method, and a line saying what the numbers are.

        Columns: ``method``, ``accuracy (mean ± std, %)``, ``runs``, ``seconds / run``. The std is
        the sample standard deviation over seeds (``ddof=1``), 0 when a method has a single run.

        Example::

            | method | accuracy (mean ± std, %) | runs | seconds / run |
            |---|---:|---:|---:|
            | l2 | 90.53 ± 0.45 | 3 | 41.2 |
            | delta | 92.50 ± 0.56 | 3 | 55.0 |

            Accuracy on the test split, mean ± sample std (ddof=1) over seeds 0, 1, 2 ...
        """
        lines = [
            "| method | accuracy (mean ± std, %) | runs | seconds / run |",
            "|---|---:|---:|---:|",
        ]
        splits = {row.split for row in self.rows}
        for row in self.rows:
            note = f" ({row.split})" if len(splits) > 1 else ""
            lines.append(
                f"| {row.method} | {row.mean:.2f} ± {row.std:.2f}{note} | {row.n} | "
                f"{row.seconds:.1f} |"
            )
        if len(splits) == 1:
            (split,) = splits
            where = f"the {split} split" + (
                " (the data has no test split)" if split == "val" else ""
            )
        else:
            where = "the split named in each row (val: the data has no test split)"
        seeds = ", ".join(str(s) for s in self.seeds)
        lines += [
            "",
            f"Accuracy on {where}, mean ± sample standard deviation (ddof=1) over seeds {seeds}; "
            "the std is 0 for a method with a single run. Seconds: wall-clock time of one run.",
        ]
        if self.settings_note:
            lines += ["", self.settings_note]
        return "\n".join(lines) + "\n"

    def _seed_table(self) -> str:
        """Markdown table of every run's accuracy, one column per seed (paired across methods)."""
        lines = [
            "| method | " + " | ".join(f"seed {s}" for s in self.seeds) + " |",
            "|---|" + "---:|" * len(self.seeds),
        ]
        for row in self.rows:
            by_seed = {run.seed: run.accuracy for run in row.runs}
            cells = [f"{by_seed[s]:.2f}" if s in by_seed else "" for s in self.seeds]
            lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Everything in ``compare.json``: seeds, per-method rows and every run."""
        return {
            "seeds": self.seeds,
            "methods": [row.method for row in self.rows],
            "rows": [row.to_dict() for row in self.rows],
            "runs": [run.to_dict() for run in self.runs],
        }

    def write(self, out: Path | None = None) -> dict[str, Path | None]:
        """Write ``compare.md``, ``compare.json`` and ``compare.png`` into ``out`` (or ``.out``).

        Returns:
            ``{"markdown": path, "json": path, "plot": path or None}``; the plot is ``None``
            when matplotlib is not installed.
        """
        out = self.out if out is None else Path(out)
        out.mkdir(parents=True, exist_ok=True)
        markdown = out / "compare.md"
        markdown.write_text(
            "# deltaft compare\n\n"
            + self.table_markdown()
            + "\n## Accuracy of each run (%)\n\n"
            + self._seed_table()
        )
        summary = out / "compare.json"
        summary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        splits = "/".join(sorted({row.split for row in self.rows}))
        plot = plot_compare(
            {row.method: row.accuracies for row in self.rows},
            out / "compare.png",
            title=f"{splits} accuracy, {len(self.seeds)} seed(s)",
        )
        return {"markdown": markdown, "json": summary, "plot": plot}
