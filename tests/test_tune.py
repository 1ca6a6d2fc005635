"""deltaft tune (#15): spaces, studies that outlive their process, validation-only scoring,
pruning, failed trials, the command line and ``compare --tuned``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deltaft.app.config import TrainConfig, load_config
from deltaft.app.errors import SettingError
from deltaft.app.tune import TuneOptions, run_tune
from deltaft.app.tune_report import load_tuned
from deltaft.app.tune_space import DEFAULT_SPACES, method_space, parse_search_space
from deltaft.app.tune_study import GRACE_S, open_study, storage_of, study_name
from deltaft.engine import NonFiniteLossError
from tests.cli_support import MODEL, raises_rendered, run_main, write_images

optuna = pytest.importorskip("optuna")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for split, n, seed in (("train", 8, 0), ("val", 4, 1), ("test", 4, 2)):
        write_images(root, split, n, seed)
    return root


def _base(data: Path | str, **changes: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "data": str(data),
        "model": MODEL,
        "out": "unused",
        "weights": "none",
        "image_size": 16,
        "epochs": 2,
        "batch_size": 8,
        "workers": 0,
        "method": "l2",
    }
    return TrainConfig(**{**settings, **changes})


def _score(cfg: TrainConfig) -> float:
    """The fake trials' validation accuracy: best at lr = 0.01, worse away from it (log)."""
    return max(0.0, 1.0 - abs(math.log10(cfg.lr) + 2) / 4)


class _FakeTraining:
    """Stands for run_training: reports ``_score`` every epoch, records its calls."""

    def __init__(
        self,
        fail_if: Any = None,
        interrupt_at: int | None = None,
        error: Exception | None = None,
    ) -> None:
        self.calls: list[TrainConfig] = []
        self.fail_if, self.interrupt_at = fail_if, interrupt_at
        self.error = error or NonFiniteLossError("loss became nan at epoch 1")

    def __call__(self, cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(cfg)
        Path(cfg.out).mkdir(parents=True)
        if "on_epoch" not in kwargs:  # compare --tuned: a normal run, scored on test
            (Path(cfg.out) / "config.yaml").write_text(cfg.to_yaml())
            summary = {"method": cfg.method, "seed": cfg.seed, "seconds": 1.0}
            return {**summary, "val_accuracy": 0.5, "test_accuracy": _score(cfg) - 0.1}
        assert kwargs["test"] is False  # tuning never reads the test split
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at + 1:
            raise KeyboardInterrupt
        if self.fail_if is not None and self.fail_if(cfg):
            raise self.error
        for epoch in (1, 2):
            kwargs["on_epoch"]({"epoch": epoch, "epochs": 2, "val/acc": _score(cfg) * epoch / 2})
        return {
            "val_accuracy": _score(cfg),
            "best_val_accuracy": _score(cfg),
            "epochs": 2,
            "test_accuracy": None,
        }


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> _FakeTraining:
    training = _FakeTraining()
    monkeypatch.setattr("deltaft.app.train.run_training", training)
    return training


def _trials(out: Path, method: str = "l2") -> list[Any]:
    study = optuna.load_study(study_name=study_name(method), storage=storage_of(out, None))
    return study.get_trials(deepcopy=False)


def _tuned_row(out: Path, method: str = "l2") -> dict[str, Any]:
    return dict(json.loads((out / "tune.json").read_text())["methods"][method])


def _states(out: Path, method: str = "l2") -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in _trials(out, method):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------
# Spaces
# ------------------------------------------------------------------------------------------------
def test_default_spaces_per_method_and_user_overrides() -> None:
    assert list(method_space("l2")) == ["lr", "weight_decay"]
    assert sorted(method_space("delta")) == ["alpha", "beta", "lr"]
    assert sorted(method_space("l2sp+wise")) == ["alpha", "beta", "lr"]  # recipes add their own
    assert set(DEFAULT_SPACES) >= {"all", "l2", "l2sp", "fm", "delta"}
    user = parse_search_space(
        {
            "all": {"lr": [0.001, 0.01]},
            "delta": {"beta": None, "alpha": {"low": 0, "high": 2, "log": False}},
            "delta+lpft": {"alpha": {"choices": [0.1, 1]}},
            "l2": {"weight-decay": 0.001, "batch_size": {"choices": [8, 16]}},
        }
    )
    delta = method_space("delta", user)
    assert sorted(delta) == ["alpha", "lr"]  # beta: null -> not tuned
    assert (delta["lr"].low, delta["lr"].high, delta["lr"].log) == (0.001, 0.01, True)
    assert (delta["alpha"].low, delta["alpha"].high, delta["alpha"].log) == (0.0, 2.0, False)
    assert delta["alpha"].grid_points() == [0.0, 1.0, 2.0]
    assert method_space("delta+lpft", user)["alpha"].choices == (0.1, 1)  # the spec's own entry
    l2 = method_space("l2", user)
    assert l2["weight_decay"].choices == (0.001,) and l2["batch_size"].integer
    assert [round(p, 6) for p in l2["lr"].grid_points()] == [0.001, 0.003162, 0.01]


def test_a_study_is_bound_to_its_space_grid_included(data: Path, tmp_path: Path) -> None:
    base, storage = _base(data), storage_of(tmp_path / "tune", None)
    match = r"another space \(.*\(grid 0.001, 0.01\)'.* there, .*\(grid 0.001, 0.1\)'"
    for grid, refused in (([0.001, 0.01], False), ([0.001, 0.01], False), ([0.001, 0.1], True)):
        user = parse_search_space({"l2": {"lr": {"low": 1e-4, "high": 0.1, "grid": grid}}})
        options = TuneOptions(sampler="grid", space=user)
        if refused:
            with raises_rendered(SettingError, match):
                open_study(base, "l2", method_space("l2", user), options, storage)
        else:
            open_study(base, "l2", method_space("l2", user), options, storage)


def test_a_space_that_tunes_a_setting_the_method_ignores_is_refused() -> None:
    user = parse_search_space({"all": {"bss_eta": [1e-4, 1e-2]}, "l2": {"weight_decay": None}})
    assert sorted(method_space("l2+bss", user)) == ["bss_eta", "lr"]
    with pytest.raises(SettingError, match=r"space of l2 tunes bss_eta, which l2 does not use "):
        method_space("l2", user)
    user = parse_search_space({"delta": {"lwf_temperature": [1, 4]}})
    with pytest.raises(SettingError, match=r"lwf_temperature, which delta does not use \(it "):
        method_space("delta", user)


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ([1, 2], r"search_space must be a mapping"),
        ({"adam": {"lr": [0.1, 1]}}, r"'adam' is not 'all', a base method"),
        ({"l2": {"momentm": [0.1, 0.9]}}, r"search_space.l2.momentm: not a setting that can"),
        ({"l2": {"data": ["a", "b"]}}, r"search_space.l2.data: not a setting"),
        ({"l2": {"lr": [0.1, 0.01]}}, r"low must be below high, got \[0.1, 0.01\]"),
        ({"l2": {"lr": [0, 0.01]}}, r"log-uniform range needs low > 0, got 0"),
        ({"l2": {"alpha": {"low": -1, "high": 1, "log": False}}}, r"-1.0 is not a valid alpha"),
        ({"l2": {"lr": {"choices": []}}}, r"choices must be a non-empty list"),
        ({"l2": {"lr": {"low": 0.1, "hi": 1}}}, r"hi is not a key of a range"),
        ({"l2": {"lr": {"low": "x", "high": 1}}}, r"a range needs numbers low and high"),
        ({"l2": {"lr": {"low": 0.1, "high": 1, "log": "yes"}}}, r"log must be true or false"),
        ({"l2": "lr"}, r"search_space.l2 must map settings to ranges"),
        ({"l2": {"optimizer": {"choices": ["sgd", "lion"]}}}, r"'lion' is not a valid optim"),
    ],
)
def test_bad_spaces_are_refused_with_what_to_write(space: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_search_space(space)


def test_bad_options_methods_and_data_are_refused_before_any_work(
    fake: _FakeTraining, data: Path, tmp_path: Path
) -> None:
    with raises_rendered(SettingError, r"--trials must be >= 1, got 0"):
        TuneOptions(trials=0)
    with raises_rendered(SettingError, r"--jobs must be >= 1, got 0"):
        TuneOptions(jobs=0)
    with raises_rendered(SettingError, r"--pruner must be one of median, halving, none"):
        TuneOptions(pruner="hyperband")  # type: ignore[arg-type]
    out = tmp_path / "tune"
    with raises_rendered(SettingError, r"--methods: 'scratch' cannot be tuned"):
        run_tune(_base(data), ["l2", "scratch"], out, TuneOptions())
    with pytest.raises(ValueError, match=r"Unknown base method 'adam'"):
        run_tune(_base(data), ["adam"], out, TuneOptions())
    empty = parse_search_space({"l2": {"lr": None, "weight_decay": None}})
    with pytest.raises(ValueError, match=r"search space of l2 is empty: nothing to tune"):
        run_tune(_base(data), ["l2"], out, TuneOptions(space=empty))
    flat = tmp_path / "flat"  # DIR/<class>/*: train and test, no validation
    write_images(flat, ".", 5, 0)
    with raises_rendered(SettingError, r"no validation split; set --val-split \(e.g. 0.2\)"):
        run_tune(_base(flat), ["l2"], out, TuneOptions())
    with raises_rendered(SettingError, r"--storage 'tune.db' is not a database URL; e.g. sqlite"):
        run_tune(_base(data), ["l2"], out, TuneOptions(storage="tune.db"))
    with raises_rendered(SettingError, r"--storage sqlite:////no/such/dir/t.db cannot be opened"):
        run_tune(_base(data), ["l2"], out, TuneOptions(storage="sqlite:////no/such/dir/t.db"))
    assert not out.exists() and fake.calls == []  # nothing written, nothing trained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("lr: 0.1\n")
    with raises_rendered(SettingError, r"holds a training run, not a tuning folder"):
        run_tune(_base(data), ["l2"], run_dir, TuneOptions())


def test_optuna_missing_says_how_to_install_it(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(ValueError, match=r"needs Optuna: pip install 'deltaft\[tune\]'"):
        run_tune(_base(data), ["l2"], tmp_path / "t", TuneOptions(trials=1))


# ------------------------------------------------------------------------------------------------
# Studies (fake trainings: the machinery, fast)
# ------------------------------------------------------------------------------------------------
def test_a_study_counts_finished_trials_and_writes_the_results(
    fake: _FakeTraining, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tune"
    result = run_tune(_base(data), ["l2", "l2sp"], out, TuneOptions(trials=6, pruner="none"))
    assert len(fake.calls) == 12 and _states(out) == {"COMPLETE": 6}
    assert {Path(c.out).relative_to(out).parts[:2] for c in fake.calls} == {
        ("trials", "l2"),
        ("trials", "l2sp"),
    }
    l2 = result.methods[0]
    best = max(_trials(out), key=lambda t: t.value)
    assert l2.best_value == best.value and l2.best_params == best.params
    # The best settings: a config for `deltaft train --config`, the base with the trial's values.
    cfg = TrainConfig.from_sources(load_config(out / "best" / "l2.yaml"))
    assert (cfg.method, cfg.lr, cfg.weight_decay) == (
        "l2",
        best.params["lr"],
        best.params["weight_decay"],
    )
    assert (cfg.epochs, cfg.image_size, cfg.data) == (2, 16, str(data))
    summary = json.loads((out / "tune.json").read_text())["methods"]["l2sp"]
    assert sorted(summary["best_params"]) == ["alpha", "beta", "lr"]
    assert (summary["complete"], summary["pruned"], summary["failed"]) == (6, 0, 0)
    table = (out / "tune.md").read_text()
    assert "| l2sp |" in table and "test split was not read" in table
    assert load_tuned(out) == {"l2": best.params, "l2sp": summary["best_params"]}
    # keep_trials=best: only each method's best run folder stays.
    assert sorted(p.name for p in (out / "trials" / "l2").iterdir()) == [str(best.number)]
    # Run again with more trials: the study continues (6 kept, 2 new), same settings required.
    run_tune(_base(data), ["l2"], out, TuneOptions(trials=8, pruner="none"))
    assert _states(out) == {"COMPLETE": 8} and len(fake.calls) == 14
    with raises_rendered(
        SettingError,
        r"study deltaft:l2 .*another config \(epochs: 2 there, 3 now\).*--out or --storage",
    ):
        run_tune(_base(data, epochs=3), ["l2"], out, TuneOptions(trials=8))
    with raises_rendered(SettingError, r"another space"):
        space = parse_search_space({"l2": {"lr": [0.001, 0.01]}})
        run_tune(_base(data), ["l2"], out, TuneOptions(trials=8, space=space))


def test_failed_trials_are_recorded_and_the_study_goes_on(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeTraining(fail_if=lambda cfg: cfg.lr > 0.03)
    monkeypatch.setattr("deltaft.app.train.run_training", fake)
    out = tmp_path / "tune"
    result = run_tune(_base(data), ["l2"], out, TuneOptions(trials=5, pruner="none"))
    failed = [t for t in _trials(out) if t.state.name == "FAIL"]
    assert failed and all(t.params["lr"] > 0.03 for t in failed)
    assert all("loss became nan" in t.user_attrs["error"] for t in failed)
    assert _states(out)["COMPLETE"] == 5 and result.methods[0].failed == len(failed)
    rows = json.loads((out / "tune.json").read_text())["methods"]["l2"]["trials"]
    assert {r["error"] for r in rows if r["state"] == "FAIL"} == {"loss became nan at epoch 1"}
    # Any error is a failed trial: here an SVD that does not converge (+bss at a diverging lr)
    svd = RuntimeError("linalg.svd: The algorithm failed to converge")
    monkeypatch.setattr(
        "deltaft.app.train.run_training", _FakeTraining(fail_if=lambda c: c.lr > 0.03, error=svd)
    )
    run_tune(_base(data), ["l2"], tmp_path / "t1", TuneOptions(trials=5, pruner="none"))
    failed = [t for t in _trials(tmp_path / "t1") if t.state.name == "FAIL"]
    assert failed and {t.user_attrs["error"] for t in failed} == {f"RuntimeError: {svd}"}
    assert _states(tmp_path / "t1")["COMPLETE"] == 5
    # Failing next to the optimum (TPE learns nothing from failed trials, so it keeps drawing
    # there): the study stops once as many trials failed as it was to finish, with a warning.
    monkeypatch.setattr(
        "deltaft.app.train.run_training", _FakeTraining(fail_if=lambda c: c.lr > 0.01)
    )
    stuck = run_tune(_base(data), ["l2"], tmp_path / "t3", TuneOptions(trials=5, pruner="none"))
    assert stuck.methods[0].failed == 5 and 0 < _states(tmp_path / "t3")["COMPLETE"] < 5
    # Every trial failing: the settings are wrong, not the trials; stop with the message.
    monkeypatch.setattr("deltaft.app.train.run_training", _FakeTraining(fail_if=lambda c: True))
    with pytest.raises(ValueError, match=r"3 trials failed in a row and none finished; the last"):
        run_tune(_base(data), ["l2sp"], tmp_path / "t2", TuneOptions(trials=5))


def test_an_interrupted_trial_is_retried_by_the_next_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "tune"
    monkeypatch.setattr("deltaft.app.train.run_training", _FakeTraining(interrupt_at=2))
    with pytest.raises(KeyboardInterrupt):
        run_tune(_base(data), ["l2"], out, TuneOptions(trials=4, pruner="none"))
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert "interrupted" in trials[2].user_attrs["error"]
    assert trials[3].system_attrs["fixed_params"] == trials[2].params  # enqueued again
    fake = _FakeTraining()
    monkeypatch.setattr("deltaft.app.train.run_training", fake)
    run_tune(_base(data), ["l2"], out, TuneOptions(trials=4, pruner="none"))
    trials = _trials(out)
    assert _states(out) == {"COMPLETE": 4, "FAIL": 1} and len(fake.calls) == 2
    row = _tuned_row(out)
    assert (row["complete"], row["failed"], row["retried"]) == (4, 0, 1)  # not a failure
    assert trials[3].user_attrs["retry_of"] == 2 and trials[3].state.name == "COMPLETE"


def test_a_trial_left_running_by_a_dead_process_is_marked_failed_and_retried(
    fake: _FakeTraining, data: Path, tmp_path: Path
) -> None:
    """As after a SIGKILL: a RUNNING trial whose process (on this machine) is gone, or whose
    heartbeat (another machine) stopped longer ago than the grace period."""
    out = tmp_path / "tune"
    base, options = _base(data), TuneOptions(trials=4, pruner="none")
    storage = storage_of(out, None)
    study = open_study(base, "l2", method_space("l2"), options, storage)
    script = "import os; print(os.getpid())"
    dead = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    for key, value in (("host", socket.gethostname()), ("pid", int(dead.stdout))):
        trial.set_user_attr(key, value)
    live = study.ask()  # a trial of a process that still runs (this one's parent): kept
    live.set_user_attr("host", socket.gethostname())
    live.set_user_attr("pid", os.getppid())
    (out / "trials" / "l2" / "1").mkdir(parents=True)  # that process's run folder
    silent = study.ask()  # another machine's, silent for longer than the grace period
    silent.set_user_attr("host", "elsewhere")
    silent.set_user_attr("pid", 1)
    silent.set_user_attr("heartbeat", time.time() - GRACE_S - 60)
    run_tune(base, ["l2"], out, options)
    assert (out / "trials" / "l2" / "1").is_dir()  # not removed under the other's feet
    trials = _trials(out)
    assert (
        trials[0].state.name == "FAIL"
        and "ended mid-trial; retried" in trials[0].user_attrs["error"]
    )
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params
    assert retry[0].state.name == "COMPLETE"
    assert trials[1].state.name == "RUNNING"  # alive elsewhere: counted, not retried
    assert trials[2].state.name == "FAIL" and "(1 on elsewhere)" in trials[2].user_attrs["error"]
    assert _states(out) == {"COMPLETE": 3, "FAIL": 2, "RUNNING": 1}


def test_grid_sampler_tries_each_point_once(
    fake: _FakeTraining, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tune"
    space = parse_search_space(
        {"l2": {"lr": {"choices": [0.001, 0.01, 0.1]}, "weight_decay": None}}
    )
    options = TuneOptions(trials=10, sampler="grid", pruner="none", space=space)
    result = run_tune(_base(data), ["l2"], out, options)
    assert sorted(c.lr for c in fake.calls) == [0.001, 0.01, 0.1]  # 3 points, not 10 trials
    assert result.methods[0].best_params == {"lr": 0.01}


def test_grid_sampler_does_not_retry_a_point_that_fails(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeTraining(fail_if=lambda cfg: cfg.lr == 0.1)
    monkeypatch.setattr("deltaft.app.train.run_training", fake)
    space = parse_search_space(
        {"l2": {"lr": {"choices": [0.1, 0.001, 0.01]}, "weight_decay": None}}
    )
    options = TuneOptions(trials=10, sampler="grid", pruner="none", space=space)
    result = run_tune(_base(data), ["l2"], tmp_path / "tune", options)
    assert sorted(c.lr for c in fake.calls) == [0.001, 0.01, 0.1]  # each once, 0.1 failed
    assert _states(tmp_path / "tune") == {"COMPLETE": 2, "FAIL": 1}
    assert result.methods[0].best_params == {"lr": 0.01}


def test_a_trial_is_never_pruned_after_its_last_epoch(
    fake: _FakeTraining, data: Path, tmp_path: Path
) -> None:
    """With --iterations the epoch count is the run's (the loop gives it): a poor trial that
    reaches its last epoch is complete, not pruned with its finished training thrown away."""
    out = tmp_path / "tune"
    base = _base(data, epochs=None, iterations=4)
    space = parse_search_space({"l2": {"lr": {"choices": [0.01, 1e-4]}, "weight_decay": None}})
    options = TuneOptions(trials=3, pruner="median", space=space)
    study = open_study(base, "l2", method_space("l2", space), options, storage_of(out, None))
    for lr in (0.01, 0.01, 1e-4):  # two good trials set the median, then a poor one
        study.enqueue_trial({"lr": lr})
    run_tune(base, ["l2"], out, options)
    assert [t.state.name for t in _trials(out)] == ["COMPLETE"] * 3


def test_two_processes_that_start_together_sample_different_settings(
    fake: _FakeTraining, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `deltaft tune` on one storage (here two threads, each its own storage object) read
    the same empty history, then ask at once: the storage numbers their trials 0 and 1, and each
    trial is sampled with the seed of its number."""
    import threading

    from deltaft.app.tune_trial import TuneContext

    out = tmp_path / "tune"
    base, options = _base(data), TuneOptions(trials=2, pruner="none")
    spaces = {"l2": method_space("l2")}
    open_study(base, "l2", spaces["l2"], options, storage_of(out, None))
    barrier, asked = threading.Barrier(2, timeout=60), set()
    real_ask = optuna.study.Study.ask

    def ask(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() not in asked:  # both have read the history: ask together
            asked.add(threading.get_ident())
            barrier.wait()
        return real_ask(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "ask", ask)
    errors: list[BaseException] = []

    def process() -> None:
        try:
            TuneContext(base, out, options, spaces).work()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=process) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    trials = [t for t in _trials(out) if not t.user_attrs.get("surplus")]  # a race's spare
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert trials[0].params != trials[1].params


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_cli_tune_reads_spaces_from_the_config_file_and_refuses_bad_input(
    fake: _FakeTraining, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tune.yaml"
    config.write_text(
        f"data: {data}\nmodel: {MODEL}\nweights: none\nimage_size: 16\nepochs: 2\n"
        "search_space:\n  l2: {lr: {choices: [0.001, 0.01]}, weight_decay: null}\n"
    )
    out = tmp_path / "tune"
    common = ("tune", "--config", str(config), "--methods", "l2", "--out", str(out))
    code, stdout, _ = run_main(
        capsys, *common, "--trials", "2", "--sampler", "grid", "--workers", "0"
    )
    assert code == 0, stdout
    assert "| l2 | 100.00 | lr=0.01 | 2 | 0 | 0 | 0 |" in stdout and "compare --tuned" in stdout
    assert sorted(c.lr for c in fake.calls) == [0.001, 0.01]
    for argv, match in (
        (("--trials", "0"), r"--trials must be >= 1, got 0"),
        (("--method", "l2"), r"--method: not an option of tune; use --methods"),
        (("--resume",), r"--resume: not an option of tune"),
        (("--methods", "l2,scratch"), r"--methods: 'scratch' cannot be tuned"),
        (("--sampler", "cmaes"), r"argument --sampler: invalid choice: 'cmaes'"),
    ):
        code, _, err = run_main(capsys, *common, *argv)
        assert code == 2 and re.search(match, err), err
    # the key as a flag would spell it, and twice
    config.write_text(config.read_text().replace("search_space:", "search-space:"))
    again = ("--trials", "2", "--sampler", "grid", "--out", str(tmp_path / "t2"))
    code, stdout, _ = run_main(capsys, *common, *again)
    assert code == 0 and sorted(c.lr for c in fake.calls[2:]) == [0.001, 0.01], stdout
    config.write_text(config.read_text() + "search_space: {}\n")
    code, _, err = run_main(capsys, *common)
    assert code == 2 and "sets both search_space and search-space; keep one" in err, err
    config.write_text(config.read_text().replace("search_space: {}\n", ""))
    config.write_text(config.read_text().replace("weight_decay: null", "wd: 1"))
    code, _, err = run_main(capsys, *common)
    assert code == 2 and "tune.yaml: search_space.l2.wd: not a setting that can be tuned" in err


def test_compare_tuned_retrains_each_method_with_its_best_settings(
    fake: _FakeTraining, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tuned = tmp_path / "tune"
    run_tune(_base(data, epochs=3), ["l2", "l2sp"], tuned, TuneOptions(trials=3, pruner="none"))
    best = load_tuned(tuned)
    fake.calls.clear()
    out = tmp_path / "cmp"
    argv = ("compare", "--tuned", str(tuned), "--seeds", "2", "--out", str(out), "--workers", "0")
    code, stdout, err = run_main(capsys, *argv)
    assert code == 0, err
    assert [(c.method, c.seed) for c in fake.calls] == [
        ("l2", 0),
        ("l2", 1),
        ("l2sp", 0),
        ("l2sp", 1),
    ]
    for cfg in fake.calls:  # the tune's base settings, the method's own best ones
        assert {k: getattr(cfg, k) for k in best[cfg.method]} == best[cfg.method]
        assert (cfg.data, cfg.model, cfg.epochs, cfg.image_size) == (str(data), MODEL, 3, 16)
    note = "chosen on the validation split by deltaft tune"
    assert note in stdout and note in (out / "compare.md").read_text()
    code, _, err = run_main(capsys, *argv[:-2], "--methods", "delta", "--out", str(tmp_path / "c2"))
    assert code == 2 and "--methods delta were not tuned there (tuned: l2, l2sp)" in err
    code, _, err = run_main(
        capsys, "compare", "--tuned", str(tmp_path), "--out", str(tmp_path / "c3")
    )
    assert code == 2 and "tune.json not found: --tuned takes the --out folder of a finished" in err
    # the tune's own --config file, search space and all, serves the comparison too
    config = tmp_path / "tune.yaml"
    config.write_text("batch-size: 4\nsearch_space:\n  l2: {weight_decay: null}\n")
    fake.calls.clear()
    again = ("--config", str(config), "--methods", "l2", "--out", str(tmp_path / "c4"))
    code, _, err = run_main(capsys, *argv[:-2], *again)
    assert code == 0, err
    assert [(c.method, c.batch_size) for c in fake.calls] == [("l2", 4), ("l2", 4)]


@pytest.mark.slow
def test_demo_tune_tunes_on_a_validation_part_of_the_pool_then_compares_on_test(
    fake: _FakeTraining, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltaft.app.tune_demo import prepare_tune_folder, run_demo_tune

    pool = tmp_path / "cache" / "mnist5k-x"
    write_images(pool, "train", 12, 0)
    write_images(pool, "test", 2, 1)
    monkeypatch.setattr("deltaft.app.demo.prepare_mnist5k", lambda cache_dir: pool)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {MODEL}\nweights: none\nimage_size: 16\nepochs: 2\nworkers: 0\n")
    tuning, comparison = run_demo_tune(
        tmp_path / "out", config=config, seeds=2, methods=["l2", "delta"], trials=3
    )
    folder = prepare_tune_folder(pool)  # reused: the same split
    assert folder == pool.with_name("mnist5k-x-tune") and not (folder / "test").exists()
    fit = {p.relative_to(folder / "train") for p in (folder / "train").rglob("*.png")}
    val = {p.relative_to(folder / "val") for p in (folder / "val").rglob("*.png")}
    assert (len(fit), len(val)) == (40, 8) and not fit & val  # 10 + 2 a class, disjoint
    tuned_runs, compare_runs = fake.calls[:6], fake.calls[6:]
    assert {c.data for c in tuned_runs} == {str(folder)}  # tuned without any test image
    assert {c.data for c in compare_runs} == {str(pool)} and len(compare_runs) == 4
    assert [m.method for m in tuning.methods] == ["l2", "delta"]
    assert comparison.settings_note and "validation" in comparison.settings_note
    assert (tmp_path / "out" / "tune" / "tune.md").is_file()
    assert (tmp_path / "out" / "compare" / "compare.md").is_file()


# ------------------------------------------------------------------------------------------------
# Real trainings (tiny model, generated images)
# ------------------------------------------------------------------------------------------------
def _garble_test_images(data: Path) -> None:
    for path in (data / "test").rglob("*.png"):
        path.write_bytes(b"not an image at all")


def test_the_attention_that_delta_trials_share_does_not_read_the_test_split(
    data: Path, tmp_path: Path
) -> None:
    from deltaft.app.attention import run_attention

    _garble_test_images(data)  # a run that verified the test split would refuse them
    cfg = _base(data, method="delta", attention_epochs=1, attention_batches=1)
    attention = run_attention(cfg, tmp_path / "attention.safetensors")
    assert attention.layers and (tmp_path / "attention.safetensors").is_file()


@pytest.mark.slow
def test_the_test_split_is_never_read_same_choice_with_garbage_test_images(
    data: Path, tmp_path: Path
) -> None:
    from deltaft.app.train import run_training

    base = _base(data, epochs=2)
    options = TuneOptions(trials=2, pruner="none", keep_trials="all")
    first = run_tune(base, ["l2"], tmp_path / "a", options)
    _garble_test_images(data)
    with pytest.raises(ValueError, match=r"test"):  # a normal run does read them
        run_training(dataclasses.replace(base, out=str(tmp_path / "run")))
    second = run_tune(base, ["l2"], tmp_path / "b", options)
    assert first.methods[0].best_params == second.methods[0].best_params
    rows = [
        [(t["params"], t["value"], t["epochs"]) for t in r.methods[0].trials]
        for r in (first, second)
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    summary = json.loads(Path(second.methods[0].best_out, "summary.json").read_text())
    assert summary["test_accuracy"] is None and summary["test_images"] is None


@pytest.mark.slow
def test_pruning_stops_a_poor_trial_after_its_second_epoch(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    base = _base(data, epochs=3)
    space = parse_search_space({"l2": {"lr": {"choices": [0.05, 1e-7]}, "weight_decay": None}})
    options = TuneOptions(trials=3, pruner="median", keep_trials="all", space=space)
    study = open_study(base, "l2", method_space("l2", space), options, storage_of(out, None))
    for lr in (0.05, 0.05, 1e-7):  # two good trials set the median, then a poor one
        study.enqueue_trial({"lr": lr})
    result = run_tune(base, ["l2"], out, options)
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert list(trials[2].intermediate_values) == [1, 2]  # stopped after epoch 2 of 3
    rows = (out / "trials" / "l2" / "2" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and result.methods[0].pruned == 1
    assert result.methods[0].epochs_saved == (1, 3 + 3 + 2)
    assert "Pruning saved 1 epochs; 8 were trained." in (out / "tune.md").read_text()


@pytest.mark.slow
def test_two_processes_on_one_storage_finish_n_trials_in_total(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    options = TuneOptions(trials=4, pruner="none", jobs=2, keep_trials="all")
    run_tune(_base(data), ["l2"], out, options)
    trials = [t for t in _trials(out) if not t.user_attrs.get("surplus")]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and len({t.number for t in finished}) == 4
    assert len({t.user_attrs["out"] for t in finished}) == 4
    assert all(Path(t.user_attrs["out"], "summary.json").is_file() for t in finished)


@pytest.mark.slow
def test_a_killed_tune_continues_when_run_again(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-trial: the next run marks that trial failed, retries it, keeps the rest."""
    out = tmp_path / "tune"
    argv = [
        sys.executable, "-m", "deltaft", "tune", "--data", str(data), "--model", MODEL,
        "--weights", "none", "--image-size", "16", "--epochs", "40", "--batch-size", "8",
        "--workers", "0", "--method" + "s", "l2", "--trials", "2", "--pruner", "none",
        "--out", str(out), "--threads", "1", "-q",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    metrics = out / "trials" / "l2" / "0" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not metrics.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metrics.is_file(), process.stderr.read() if process.stderr else ""
    finally:
        process.kill()
        process.wait()
    assert [t.state.name for t in _trials(out)] == ["RUNNING"]
    monkeypatch.setattr("deltaft.app.train.run_training", _FakeTraining())  # the rerun: fast
    run_tune(_base(data, epochs=40), ["l2"], out, TuneOptions(trials=2, pruner="none"))
    trials = _trials(out)
    assert trials[0].state.name == "FAIL" and "ended mid-trial" in trials[0].user_attrs["error"]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    assert _states(out) == {"FAIL": 1, "COMPLETE": 2}


@pytest.mark.slow
def test_delta_trials_share_one_attention_estimate_with_the_same_result(
    data: Path, tmp_path: Path
) -> None:
    """The estimate does not depend on lr/alpha/beta: one file, and a trial that uses it ends
    exactly as a run that estimates its own."""
    from deltaft.app.train import run_training

    out = tmp_path / "tune"
    base = _base(data, method="delta", attention_epochs=1)
    space = parse_search_space(
        {"delta": {"lr": {"choices": [0.05]}, "alpha": {"choices": [0.1]}, "beta": None}}
    )
    options = TuneOptions(trials=1, pruner="none", keep_trials="all", space=space)
    result = run_tune(base, ["delta"], out, options)
    assert (out / "attention" / "delta.safetensors").is_file()
    trial_dir = Path(result.methods[0].best_out or "")
    tuned = load_config(trial_dir / "config.yaml")
    assert tuned["attention"] == str(out / "attention" / "delta.safetensors")
    own = dataclasses.replace(base, lr=0.05, alpha=0.1, out=str(tmp_path / "own"))
    summary = run_training(own, test=False)
    assert summary["val_accuracy"] == result.methods[0].best_value
    rows = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
    mine = [
        json.loads(line) for line in (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in mine]
