"""``deltaft demo --tune``: the demo's methods tuned on validation, then compared on test.

The demo's 3000-image pool (:func:`deltaft.app.demo.prepare_mnist5k`) is split once, per class
and seeded (:data:`TUNE_SPLIT_SEED`), into a fit part (2500) and a validation part (500), copied
into ``<pool>-tune/{train,val}``: that folder has no test split at all. Each method is tuned
there (:func:`deltaft.app.tune.run_tune`, ``trials`` finished trials a method, with the demo's
other settings: 20 fit images a class, 15 epochs...), then ``compare --tuned`` retrains each
method with its best settings over the seeds on the usual demo data and scores it on the 2000
test images, once.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaft._utils import atomic_directory

if TYPE_CHECKING:
    from deltaft.app.results import CompareResult
    from deltaft.app.tune_report import TuneResult
    from deltaft.engine import ProgressFn

__all__ = [
    "DEMO_TRIALS",
    "TUNE_SPLIT_SEED",
    "TUNE_VAL_FRACTION",
    "prepare_tune_folder",
    "run_demo_tune",
]

logger = logging.getLogger(__name__)

DEMO_TRIALS = 12  # finished trials a method: the stated budget of `deltaft demo --tune`
# Of the pool: 50 validation images a class. Every epoch of every trial scores them, so their
# number weighs on a trial's time (1000 would double it); 500 give a standard error of about
# 1.3 points at 90 %.
TUNE_VAL_FRACTION = 1 / 6
TUNE_SPLIT_SEED = 1
_MANIFEST = "deltaft-tune-manifest.json"


def prepare_tune_folder(pool_root: Path) -> Path:
    """``<pool_root>-tune`` with ``train/`` (fit) and ``val/`` copied from ``pool_root/train``;
    reused when its manifest lists the same split."""
    from deltaft.app.data import stratified_split

    files = sorted((pool_root / "train").rglob("*.png"))
    labels = [path.parent.name for path in files]
    classes = sorted(set(labels))
    targets = [classes.index(label) for label in labels]
    fit, val = stratified_split(targets, TUNE_VAL_FRACTION, seed=TUNE_SPLIT_SEED)
    plan = {
        "train": sorted(files[i].relative_to(pool_root / "train").as_posix() for i in fit),
        "val": sorted(files[i].relative_to(pool_root / "train").as_posix() for i in val),
    }
    root = pool_root.with_name(pool_root.name + "-tune")
    try:
        if json.loads((root / _MANIFEST).read_text()) == plan:
            return root
    except (OSError, ValueError):
        pass
    if root.exists():
        shutil.rmtree(root)
    try:
        with atomic_directory(root) as partial:
            for split, names in plan.items():
                for name in names:
                    target = partial / split / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(pool_root / "train" / name, target)
            (partial / _MANIFEST).write_text(json.dumps(plan) + "\n")
    except OSError:  # another process finished the same folder first
        if not (root / _MANIFEST).is_file():
            raise
    logger.info("demo --tune: %d fit and %d validation images in %s", len(fit), len(val), root)
    return root


def run_demo_tune(
    out: str | Path,
    *,
    config: str | Path | None = None,
    seeds: int | Sequence[int] = 3,
    methods: Sequence[str] = ("l2", "l2sp", "delta"),
    cache_dir: str | Path = "~/.cache/deltaft",
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    jobs: int = 1,
    trials: int = DEMO_TRIALS,
) -> tuple[TuneResult, CompareResult]:
    """Tune ``methods`` on the demo's validation part (``out/tune``), then compare them with
    their best settings over ``seeds`` on the test images (``out/compare``).

    Raises:
        ValueError: as :func:`deltaft.app.demo.run_demo`, or a bad tuning option.
    """
    from deltaft.app.compare import run_compare
    from deltaft.app.demo import check_offline_weights, demo_config, prepare_mnist5k
    from deltaft.app.tune import TuneOptions, run_tune
    from deltaft.app.tune_report import load_tuned

    out = Path(out)
    options = TuneOptions(trials=trials, jobs=jobs)
    cfg = demo_config("unused", out, config=config, overrides=overrides)  # fail fast
    check_offline_weights(cfg)
    pool = prepare_mnist5k(cache_dir)
    tune_data = prepare_tune_folder(pool)
    tune_out = out / "tune"
    base = demo_config(tune_data, tune_out, config=config, overrides=overrides)
    tuning = run_tune(base, methods, tune_out, options, progress=progress)
    compare_out = out / "compare"
    cfg = demo_config(pool, compare_out, config=config, overrides=overrides)
    tuned = load_tuned(tune_out)
    comparison = run_compare(
        cfg,
        methods,
        seeds,
        compare_out,
        progress=progress,
        jobs=jobs,
        tuned=tuned,
        tuned_from=str(tune_out),
    )
    return tuning, comparison
