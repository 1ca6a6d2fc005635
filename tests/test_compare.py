from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deltaft.app.compare import parse_methods, parse_seeds, run_compare
from deltaft.app.config import TrainConfig
from deltaft.app.errors import SettingError
from deltaft.app.results import CompareResult
from tests.cli_support import raises_rendered

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Test accuracy (fraction) of each fake run: (method as trained, weights, seed) -> accuracy.
ACCURACY = {
    ("l2", "imagenet", 0): 0.80,
    ("l2", "imagenet", 1): 0.82,
    ("l2", "imagenet", 2): 0.84,
    ("delta", "imagenet", 0): 0.90,
    ("delta", "imagenet", 1): 0.91,
    ("delta", "imagenet", 2): 0.95,
    ("l2", "none", 0): 0.50,
    ("l2", "none", 1): 0.40,
    ("l2", "none", 2): 0.45,
}


def _base(**changes: Any) -> TrainConfig:
    return TrainConfig(data="data", model="resnet18", out="unused", **changes)


class _FakeTraining:
    """Records its calls and writes a run folder like run_training: config.yaml, summary.json.

    ``fail_at=k``: the k-th call (0-based) starts its run folder, then the user interrupts it.
    ``config_in_summary``: whether summary.json holds the config too (run_training's does).
    """

    def __init__(
        self,
        *,
        test_split: bool = True,
        fail_at: int | None = None,
        config_in_summary: bool = True,
    ) -> None:
        self.calls: list[TrainConfig] = []
        self.test_split = test_split
        self.fail_at = fail_at
        self.config_in_summary = config_in_summary

    def __call__(self, cfg: TrainConfig, *, progress: Any = None) -> dict[str, Any]:
        run_dir = Path(cfg.out)
        if not cfg.resume:
            run_dir.mkdir(parents=True)  # a fresh run never reuses a folder
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # the user stops the comparison mid-way
        self.calls.append(cfg)
        accuracy = ACCURACY[(cfg.method, cfg.weights, cfg.seed)]
        summary = {
            "method": cfg.method,
            "seed": cfg.seed,
            "test_accuracy": accuracy if self.test_split else None,
            "val_accuracy": accuracy - 0.1,
            "seconds": 10.0 + cfg.seed,
        }
        if self.config_in_summary:
            summary["config"] = cfg.to_dict()
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> _FakeTraining:
    fake = _FakeTraining()
    monkeypatch.setattr("deltaft.app.train.run_training", fake)
    return fake


def _compare(
    out: Path, methods: str = "l2,delta", seeds: Any = 3, base: TrainConfig | None = None
) -> CompareResult:
    return run_compare(base or _base(), parse_methods(methods), seeds, out)


def test_runs_every_method_and_seed_with_the_same_base(fake: _FakeTraining, tmp_path: Path) -> None:
    _compare(tmp_path, "l2,delta,scratch", 3)
    got = [(c.method, c.weights, c.seed, c.out, c.data) for c in fake.calls]
    assert got == [
        (method, weights, seed, str(tmp_path / f"{label}-seed{seed}"), "data")
        for label, method, weights in [
            ("l2", "l2", "imagenet"),
            ("delta", "delta", "imagenet"),
            ("scratch", "l2", "none"),
        ]
        for seed in (0, 1, 2)
    ]


def test_table_mean_and_sample_std(fake: _FakeTraining, tmp_path: Path) -> None:
    result = _compare(tmp_path, "l2,delta,scratch", 3)
    # l2: 80, 82, 84 -> mean 82, deviations -2 0 2 -> var 8/2 -> std 2
    # delta: 90, 91, 95 -> mean 92, deviations -2 -1 3 -> var 14/2 -> std sqrt(7) = 2.6458
    # scratch: 50, 40, 45 -> mean 45, deviations 5 -5 0 -> var 50/2 -> std 5
    # seconds: 10, 11, 12 -> 11 for every method
    lines = result.table_markdown().splitlines()
    assert lines[:5] == [
        "| method | accuracy (mean ± std, %) | runs | seconds / run |",
        "|---|---:|---:|---:|",
        "| l2 | 82.00 ± 2.00 | 3 | 11.0 |",
        "| delta | 92.00 ± 2.65 | 3 | 11.0 |",
        "| scratch | 45.00 ± 5.00 | 3 | 11.0 |",
    ]
    assert "test split" in lines[6]
    assert "ddof=1" in lines[6]
    assert "seeds 0, 1, 2" in lines[6]
    assert [row.method for row in result.rows] == ["l2", "delta", "scratch"]
    assert result.rows[1].accuracies == pytest.approx([90.0, 91.0, 95.0])
    assert result.rows[1].std == pytest.approx(7**0.5)


def test_single_seed_has_zero_std(fake: _FakeTraining, tmp_path: Path) -> None:
    result = _compare(tmp_path, "delta", [2])
    assert result.table_markdown().splitlines()[2] == "| delta | 95.00 ± 0.00 | 1 | 12.0 |"
    assert "seeds 2;" in result.table_markdown()


def test_falls_back_to_val_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("deltaft.app.train.run_training", _FakeTraining(test_split=False))
    result = _compare(tmp_path, "l2", 2)
    table = result.table_markdown()
    assert "| l2 | 71.00 ± 1.41 | 2 | 10.5 |" in table  # val = test - 10 points: 70, 72
    assert "val split (the data has no test split)" in table
    assert {run.split for run in result.runs} == {"val"}


def test_writes_markdown_json_and_png(fake: _FakeTraining, tmp_path: Path) -> None:
    result = _compare(tmp_path / "cmp", "l2,delta", 2)
    out = tmp_path / "cmp"
    markdown = (out / "compare.md").read_text()
    assert result.table_markdown() in markdown
    assert "| delta | 90.00 | 91.00 |" in markdown  # the per-seed table
    assert result.files["markdown"] == out / "compare.md"
    assert result.files["json"] == out / "compare.json"
    data = json.loads((out / "compare.json").read_text())
    assert data["seeds"] == [0, 1]
    assert data["methods"] == ["l2", "delta"]
    assert data["rows"][0]["accuracy_mean"] == pytest.approx(81.0)
    assert data["rows"][0]["accuracy_std"] == pytest.approx(2**0.5)
    assert [(r["method"], r["seed"]) for r in data["runs"]] == [
        ("l2", 0),
        ("l2", 1),
        ("delta", 0),
        ("delta", 1),
    ]
    assert data["runs"][3]["run_dir"] == str(out / "delta-seed1")
    pytest.importorskip("matplotlib")
    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert len(png) > 1000


def test_resume_reuses_finished_runs(
    fake: _FakeTraining, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _compare(tmp_path, "l2,delta", 2)
    assert len(fake.calls) == 4
    fake.calls.clear()
    with caplog.at_level(logging.INFO, logger="deltaft.app.compare"):
        result = _compare(tmp_path, "l2,delta,scratch", 3)  # one more method, one more seed
    assert [(c.method, c.weights, c.seed) for c in fake.calls] == [
        ("l2", "imagenet", 2),
        ("delta", "imagenet", 2),
        ("l2", "none", 0),
        ("l2", "none", 1),
        ("l2", "none", 2),
    ]
    reused = [(run.method, run.seed) for run in result.runs if run.reused]
    assert reused == [("l2", 0), ("l2", 1), ("delta", 0), ("delta", 1)]
    assert sum("reusing finished run" in r.getMessage() for r in caplog.records) == 4
    assert result.table_markdown().splitlines()[3] == "| delta | 92.00 ± 2.65 | 3 | 11.0 |"
    fake.calls.clear()
    _compare(tmp_path, "l2,delta,scratch", 3)
    assert fake.calls == []  # everything reused


def test_interrupted_compare_continues(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("deltaft.app.train.run_training", _FakeTraining(fail_at=3))
    with pytest.raises(KeyboardInterrupt):  # l2 seeds 0-2 finish, delta seed 0 is interrupted
        _compare(tmp_path, "l2,delta", 3)
    assert not (tmp_path / "compare.json").exists()
    assert (tmp_path / "delta-seed0" / "config.yaml").exists()
    assert not (tmp_path / "delta-seed0" / "summary.json").exists()
    fake = _FakeTraining()
    monkeypatch.setattr("deltaft.app.train.run_training", fake)
    result = _compare(tmp_path, "l2,delta", 3)
    calls = [(c.method, c.seed, c.resume) for c in fake.calls]
    assert calls == [("delta", 0, True), ("delta", 1, False), ("delta", 2, False)]
    assert result.rows[1].mean == pytest.approx(92.0)
    assert [run.reused for run in result.runs] == [True] * 3 + [False] * 3


def test_refuses_a_run_folder_of_another_method(fake: _FakeTraining, tmp_path: Path) -> None:
    run_dir = tmp_path / "l2-seed0"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"method": "l2sp", "test_accuracy": 0.5}))
    with raises_rendered(SettingError, r"method 'l2sp'.*needs method 'l2'.*another --out"):
        _compare(tmp_path, "l2", 1)
    (run_dir / "summary.json").write_text("{not json")
    with raises_rendered(ValueError, "Cannot reuse .*summary.json.*Delete its run folder"):
        _compare(tmp_path, "l2", 1)
    assert fake.calls == []


def test_run_without_any_accuracy_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_eval(cfg: TrainConfig, *, progress: Any = None) -> dict[str, Any]:
        return {"test_accuracy": None, "val_accuracy": None, "seconds": 1.0}

    monkeypatch.setattr("deltaft.app.train.run_training", no_eval)
    with raises_rendered(SettingError, "neither a test nor a validation accuracy.*--val-split"):
        _compare(tmp_path, "l2", 1)


def test_parse_methods() -> None:
    assert parse_methods("l2, l2sp,delta") == ["l2", "l2sp", "delta"]
    assert parse_methods(["fm", "scratch"]) == ["fm", "scratch"]
    with raises_rendered(ValueError, r"Unknown base method 'bogus'.*l2, l2sp, fm, delta"):
        parse_methods("l2,bogus")
    with raises_rendered(ValueError, "No method"):
        parse_methods(" , ")
    with raises_rendered(ValueError, "l2 given more than once"):
        parse_methods("l2,delta,l2")


def test_parse_seeds() -> None:
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds(2) == [0, 1]
    assert parse_seeds("0,7, 42") == [0, 7, 42]
    assert parse_seeds("5,") == [5]
    assert parse_seeds([4]) == [4]
    with raises_rendered(ValueError, "number of seeds must be >= 1, got 0"):
        parse_seeds("0")
    with raises_rendered(ValueError, "count N .* or a comma-separated list of integers"):
        parse_seeds("a,b")
    with raises_rendered(ValueError, "distinct integers"):
        parse_seeds("1,1")


def test_options_of_other_methods_are_dropped(fake: _FakeTraining, tmp_path: Path) -> None:
    base = _base(layers=["conv1", "conv2"], attention="att.safetensors", alpha=0.1)
    _compare(tmp_path, "l2,delta,scratch", 1, base=base)
    got = [(c.method, c.weights, c.layers, c.attention, c.alpha) for c in fake.calls]
    assert got == [
        ("l2", "imagenet", None, None, 0.1),
        ("delta", "imagenet", ["conv1", "conv2"], "att.safetensors", 0.1),
        ("l2", "none", None, None, 0.1),
    ]


def test_every_run_is_validated_before_training(fake: _FakeTraining, tmp_path: Path) -> None:
    with raises_rendered(SettingError, r"--seed must be in \[0, 2\*\*63 - 1\], got -1"):
        _compare(tmp_path, "l2", [0, -1])
    assert fake.calls == []


@pytest.mark.parametrize("config_in_summary", [True, False])
def test_refuses_to_reuse_a_run_with_other_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config_in_summary: bool
) -> None:
    fake = _FakeTraining(config_in_summary=config_in_summary)  # else from config.yaml
    monkeypatch.setattr("deltaft.app.train.run_training", fake)
    _compare(tmp_path, "l2", 1, base=_base(lr=0.01))
    _compare(tmp_path, "l2", 1, base=_base(lr=0.01, workers=0, device="cpu"))  # runtime only
    assert len(fake.calls) == 1
    with raises_rendered(SettingError, r"other settings \(lr: 0.01 there, 0.1 now\).*--out"):
        _compare(tmp_path, "l2", 1, base=_base(lr=0.1))
    assert len(fake.calls) == 1


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def _cli(*args: str) -> int:
    from deltaft.cli import main

    return main(["compare", *args])


def test_cli_prints_table_and_paths(
    fake: _FakeTraining, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    code = _cli(
        "--data", "imgs", "--model", "resnet18", "--out", str(out),
        "--methods", "l2,scratch", "--seeds", "0,2", "--lr", "0.05", "--epochs", "3",
    )  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| l2 | 82.00 ± 2.83 | 2 | 11.0 |" in stdout  # 80, 84
    assert "| scratch | 47.50 ± 3.54 | 2 | 11.0 |" in stdout  # 50, 45
    assert f"wrote {out / 'compare.md'}" in stdout
    assert [(c.method, c.weights, c.seed, c.lr, c.epochs) for c in fake.calls] == [
        ("l2", "imagenet", 0, 0.05, 3),
        ("l2", "imagenet", 2, 0.05, 3),
        ("l2", "none", 0, 0.05, 3),
        ("l2", "none", 2, 0.05, 3),
    ]


def test_cli_takes_out_and_options_from_a_config_file(
    fake: _FakeTraining, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "from-config"
    config = tmp_path / "c.yaml"
    config.write_text(f"data: imgs\nmodel: resnet18\nout: {out}\nmethod: fm\nseed: 9\nalpha: 0.5\n")
    assert _cli("--config", str(config), "--methods", "delta", "--seeds", "1", "--beta", "0.2") == 0
    assert [(c.method, c.seed, c.alpha, c.beta) for c in fake.calls] == [("delta", 0, 0.5, 0.2)]
    assert f"wrote {out / 'compare.json'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "l2,bogus"], r"--methods: Unknown base method 'bogus'"),
        (["--seeds", "0"], "--seeds: The number of seeds must be >= 1"),
        (["--seeds", "x"], "--seeds: Seeds must be a count N"),
        (["--method", "l2"], "--method: not an option of compare; .* --methods l2,delta"),
        (["--seed", "3"], "--seed: not an option of compare; .* --seeds 3 .*0,7,42"),
        (["--resume"], "--resume: not an option of compare; compare always continues"),
        (["--seeds", "1", "--alpha", "-1"], "--alpha must be >= 0, got -1"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(
    fake: _FakeTraining,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code = _cli("--data", "imgs", "--model", "resnet18", "--out", str(tmp_path / "o"), *args)
    assert code == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1
    assert re.search(message, stderr), stderr
    assert fake.calls == []


def _image_folder(root: Path, classes: int = 4, per_class: int = 6, size: int = 16) -> Path:
    """A flat ``root/<class>/*.png`` folder; each class has its own mean colour."""
    gen = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        colour = np.array([64 * label, 255 - 64 * label, 128])
        for i in range(per_class):
            pixels = np.clip(colour + gen.normal(0, 30, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_cli_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    args = [
        "--data", str(data), "--model", "tests.toy_models:tiny_cnn", "--weights", "none",
        "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--attention-epochs", "1",
        "--device", "cpu", "--workers", "0", "--out", str(out), "--methods", "l2,delta",
        "--seeds", "2",
    ]  # fmt: skip
    assert _cli(*args) == 0
    stdout = capsys.readouterr().out
    assert "| method | accuracy (mean ± std, %) | runs | seconds / run |" in stdout
    assert re.search(r"\| l2 \| \d+\.\d\d ± \d+\.\d\d \| 2 \| \d+\.\d \|", stdout)
    assert re.search(r"\| delta \| \d+\.\d\d ± \d+\.\d\d \| 2 \| \d+\.\d \|", stdout)
    assert "test split" in stdout  # a flat folder is split into train and test
    for name in ("l2-seed0", "l2-seed1", "delta-seed0", "delta-seed1"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["seed"] == int(name[-1])
        assert summary["method"] == name.split("-")[0]
    assert (out / "delta-seed1" / "attention.safetensors").is_file()
    data_json = json.loads((out / "compare.json").read_text())
    assert [run["reused"] for run in data_json["runs"]] == [False] * 4
    if importlib.util.find_spec("matplotlib"):
        assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    # The same command again trains nothing: every run is reused.
    summary_times = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert _cli(*args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == summary_times
    assert [run["reused"] for run in json.loads((out / "compare.json").read_text())["runs"]] == [
        True
    ] * 4


def test_cli_compare_jobs_give_the_same_runs_as_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--jobs 2 trains in two spawned processes; every run equals its in-process twin."""
    data = _image_folder(tmp_path / "data")
    common = [
        "--data", str(data), "--model", "tests.toy_models:tiny_cnn", "--weights", "none",
        "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--attention-epochs", "1",
        "--device", "cpu", "--workers", "0", "--methods", "l2,delta", "--seeds", "2",
        "--threads", "1",
    ]  # fmt: skip
    assert _cli(*common, "--out", str(tmp_path / "one")) == 0
    capsys.readouterr()
    assert _cli(*common, "--out", str(tmp_path / "two"), "--jobs", "2") == 0
    assert "| delta |" in capsys.readouterr().out
    one = json.loads((tmp_path / "one" / "compare.json").read_text())
    two = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in two["runs"]] == [
        ("l2", 0), ("l2", 1), ("delta", 0), ("delta", 1)
    ]  # fmt: skip
    assert [r["accuracy"] for r in two["runs"]] == [r["accuracy"] for r in one["runs"]]
    for name in ("l2-seed0", "l2-seed1", "delta-seed0", "delta-seed1"):
        a = torch.load(tmp_path / "one" / name / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(tmp_path / "two" / name / "checkpoints" / "last.pt", weights_only=True)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)


def test_jobs_below_one_is_an_error(fake: _FakeTraining, tmp_path: Path) -> None:
    with raises_rendered(SettingError, "--jobs must be >= 1, got 0"):
        run_compare(_base(), ["l2"], 1, tmp_path / "cmp", jobs=0)


@pytest.mark.slow
def test_ctrl_c_stops_every_job_and_the_same_command_continues(tmp_path: Path) -> None:
    """Ctrl-C during `compare --jobs 2`: exit 130, the jobs end, the next call resumes them."""
    # Enough epochs that both jobs are still training when 5 are written (tens of ms each);
    # the rerun trains the rest, so more only costs time (150 took 250 s under a loaded xdist run).
    epochs = 60
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    command = [
        sys.executable, "-m", "deltaft", "--threads", "1", "compare", "--data", str(data),
        "--model", "tests.toy_models:tiny_cnn", "--weights", "none", "--image-size", "16",
        "--epochs", str(epochs), "--batch-size", "4", "--device", "cpu", "--workers", "0",
        "--methods", "l2", "--seeds", "2", "--jobs", "2", "--out", str(out),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(
        command, cwd=root, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = [out / f"l2-seed{seed}" / "metrics.jsonl" for seed in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(p.is_file() and len(p.read_text().splitlines()) >= 5 for p in metrics):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "the same command continues the others" in stderr
    first_lines = [p.read_text().splitlines()[0] for p in metrics]
    done_before = [len(p.read_text().splitlines()) for p in metrics]
    assert all(n < epochs for n in done_before)
    assert not any((out / f"l2-seed{seed}" / "summary.json").exists() for seed in (0, 1))

    rerun = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for file, first in zip(metrics, first_lines, strict=True):
        lines = file.read_text().splitlines()
        assert len(lines) == epochs
        assert lines[0] == first  # continued, not trained again from epoch 1


def test_jobs_send_their_log_records_to_the_parents_handlers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A job's warning reaches the handlers of this process's ``deltaft`` logger (the CLI's)."""
    import functools
    import logging.handlers
    import multiprocessing

    from deltaft.app import jobs
    from deltaft.cli.console import configure_logging

    log = logging.getLogger("deltaft")
    level, handlers = log.level, list(log.handlers)
    configure_logging(logging.INFO)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    listener = logging.handlers.QueueListener(queue, jobs.JobLogHandler())
    listener.start()
    try:
        with context.Pool(
            1, initializer=jobs.init_job_process, initargs=(1, logging.INFO, queue)
        ) as pool:
            warn = functools.partial(logging.Logger.warning, logging.getLogger("deltaft.app.x"))
            pool.map(warn, ["from the job"])
            info = functools.partial(logging.Logger.info, logging.getLogger("deltaft.app.x"))
            pool.map(info, ["not shown: jobs send warnings and errors only"])
    finally:
        listener.stop()
        log.setLevel(level)
        log.handlers[:] = handlers
    assert capsys.readouterr().err == "deltaft: warning: from the job\n"
