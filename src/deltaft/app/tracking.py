"""The run directory: resolved config, per-epoch metrics, checkpoints, attention and summary.

Layout of ``RUN_DIR``::

    config.yaml               the resolved TrainConfig (``deltaft train --config`` reads it back)
    metrics.jsonl             one JSON object per epoch
    attention.safetensors     the channel attention used (method ``delta``)
    checkpoints/last.pt       full training state, replaced atomically after every epoch
    checkpoints/best.pt       model weights of the best epoch by validation accuracy
    summary.json              final numbers, written at the end
    .deltaft.lock             held (``flock``) by the one process that writes the run
    curves.png attention.png  figures (with matplotlib)

Every file is written to a temporary file in the same directory, flushed, fsync'ed and renamed
over the target (``os.replace``), so a crash leaves either the old or the new file, never half
of one. Checkpoints hold only tensors and plain Python values: they load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltaft._utils import atomic_write, first_line
from deltaft.app.errors import SettingError

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOCK_NAME",
    "RunDir",
    "file_sha256",
    "load_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "deltaft.checkpoint/1"
_RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
LOCK_NAME = ".deltaft.lock"

if sys.platform != "win32":
    import fcntl


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` of ``folder/<name>`` left when its
    process was killed mid-write; returns them. The files they were to replace are intact."""
    stale = sorted(path for name in names for path in Path(folder).glob(f".{name}.*.tmp"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``state`` atomically, tagged with :data:`CHECKPOINT_FORMAT`."""
    payload = {"format": CHECKPOINT_FORMAT, **state}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a deltaft checkpoint (the message says how to recover).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}; was the run trained to the end of an epoch?"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors have no common base class
        raise ValueError(f"{path} is not a readable checkpoint ({first_line(error)}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a deltaft checkpoint (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {CHECKPOINT_FORMAT!r})."
        )
    return state


# ------------------------------------------------------------------------------------------------
# The run directory
# ------------------------------------------------------------------------------------------------
class RunDir:
    """Reads and writes one run's files. With ``write=False`` (non-zero ranks) writes are no-ops.

    Args:
        path: the run directory (created on the first write).
        write: whether this process writes files.
    """

    def __init__(self, path: str | os.PathLike[str], *, write: bool = True) -> None:
        self.path = Path(path)
        self.write = write
        self._lock: int | None = None  # the descriptor holding the lock file's flock
        self._created = False  # whether claim() created the directory

    # -- one writer per directory ---------------------------------------------------------------
    def claim(self) -> None:
        """Make this process the run directory's one writer, until :meth:`release`.

        Creates the directory (which also checks that it can be written) and takes an
        exclusive ``flock`` on ``.deltaft.lock`` in it. The kernel drops the lock when the
        process ends, however it ends, so a crashed run leaves nothing stuck. A no-op with
        ``write=False`` and on Windows (no ``flock``).

        Raises:
            SettingError: the path is a dangling symbolic link or a file, cannot be created or
                written, or another process holds the run.
        """
        if not self.write or self._lock is not None or sys.platform == "win32":
            return
        if self.path.is_symlink() and not self.path.exists():
            raise SettingError(
                f"{{out}} {self.path} is a symbolic link to {os.readlink(self.path)}, which does "
                "not exist; create its target or choose another {out}."
            )
        if self.path.exists() and not self.path.is_dir():
            raise SettingError(f"{{out}} {self.path} is a file; choose a directory for the run.")
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = self._lock_file()
        except OSError as error:
            raise SettingError(
                f"{{out}} {self.path} cannot be written ({error.strerror or error}); choose a "
                "folder you can write to."
            ) from None
        if self._lock is None:
            raise SettingError(
                f"{{out}} {self.path} is in use by another deltaft process (it holds "
                f"{self.path / LOCK_NAME}); wait for it to finish or stop it, or choose another "
                "{out}."
            )

    def _lock_file(self) -> int | None:
        """A descriptor of the lock file with an exclusive flock; ``None``: held elsewhere."""
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None
                raise
            # release() may have unlinked the file we locked: then lock the new one.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        """Give up the claim of :meth:`claim`; a directory it created that holds nothing but
        the lock file (the run stopped before writing anything) is removed."""
        if self._lock is None:
            return
        fd, self._lock = self._lock, None
        try:
            if self._created and [p.name for p in self.path.iterdir()] == [LOCK_NAME]:
                with contextlib.suppress(OSError):
                    (self.path / LOCK_NAME).unlink()  # before the unlock: see _lock_file
                    self.path.rmdir()
        finally:
            os.close(fd)  # drops the flock

    @property
    def claimed(self) -> bool:
        """Whether this object holds the directory's lock."""
        return self._lock is not None

    # -- paths ----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def attention_path(self) -> Path:
        return self.path / "attention.safetensors"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, name: str = "last") -> Path:
        """``checkpoints/<name>.pt`` (``last`` or ``best``)."""
        return self.checkpoint_dir / f"{name}.pt"

    # -- state ----------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Whether the directory already holds (part of) a deltaft run."""
        return any((self.path / name).exists() for name in _RUN_FILES)

    def _contents(self) -> list[Path]:
        """The directory's entries, the lock file aside."""
        if not self.path.is_dir():
            return []
        return [path for path in self.path.iterdir() if path.name != LOCK_NAME]

    def check_new(self) -> None:
        """Refuse to start a fresh run where it could overwrite anything.

        Raises:
            SettingError: the path is a file, holds a run, or is a non-empty directory.
        """
        if self.path.exists() and not self.path.is_dir():
            raise SettingError(f"{{out}} {self.path} is a file; choose a directory for the run.")
        if self.holds_run():
            raise SettingError(
                f"{{out}} {self.path} already holds a run; use {{resume}} to continue it or "
                "choose a new {out}."
            )
        if self._contents():
            raise SettingError(
                f"{{out}} {self.path} is a non-empty directory; choose a new or empty {{out}}."
            )

    def remove_stale_temporaries(self) -> None:
        """Delete what a write interrupted by a kill left (see :func:`remove_stale_temporaries`)."""
        if not self.write:
            return
        names = (
            self.config_path.name,
            self.metrics_path.name,
            self.summary_path.name,
            self.attention_path.name,
            "curves.png",
            "attention.png",
            "relationship.pt",  # cotuning
        )
        stale = remove_stale_temporaries(self.path, names)
        stale += remove_stale_temporaries(self.checkpoint_dir, ("last.pt", "best.pt", "wise.pt"))
        for path in stale:
            logger.info("Removed %s, left by an interrupted write.", path)

    # -- writers --------------------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        if self.write:
            _write_text(self.config_path, yaml_text)

    def reset_metrics(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` (on resume: the checkpoint's history)."""
        if self.write:
            _write_text(self.metrics_path, "".join(_json_line(row) for row in rows))

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and fsync it.

        Raises:
            OSError: the line could not be written (disk full, read-only file...); the message
                names the file, and a partly written line is cut off again.
        """
        if not self.write:
            return
        path = self.metrics_path
        line = _json_line(row).encode("utf-8")
        size: int | None = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as handle:
                size = handle.tell()
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            if size is not None:  # drop a partial line so that the file stays one row per line
                with contextlib.suppress(OSError):
                    os.truncate(path, size)
            raise OSError(
                error.errno,
                f"Could not write {path} ({error.strerror or error}); the epoch's row was not "
                "added",
            ) from error

    def save_checkpoint(self, state: Mapping[str, Any], name: str = "last") -> None:
        if self.write:
            save_checkpoint(state, self.checkpoint_path(name))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if self.write:
            text = json.dumps(_plain(summary), indent=2, allow_nan=False) + "\n"
            _write_text(self.summary_path, text)

    # -- readers --------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl`` (an empty list when there is none)."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def read_summary(self) -> dict[str, Any]:
        """``summary.json``.

        Raises:
            FileNotFoundError: the run has not finished.
        """
        if not self.summary_path.is_file():
            raise FileNotFoundError(f"No summary.json in {self.path}; the run has not finished.")
        data: dict[str, Any] = json.loads(self.summary_path.read_text(encoding="utf-8"))
        return data

    def load_checkpoint(self, name: str = "last") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path(name))


def _plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``, tuples lists, paths strings."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _plain(value.item())
    return value


def _json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(_plain(row), allow_nan=False) + "\n"
