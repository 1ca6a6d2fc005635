"""Small helpers that the library and the application share: one definition of each.

Module access by dotted name, the logits of a classifier's output, an eval-mode context, an fx
tracer that keeps chosen modules whole, the first line of an error, and atomic writes of a file
and of a folder.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, fx, nn

__all__ = [
    "LeafTracer",
    "atomic_directory",
    "atomic_write",
    "dtype_device",
    "eval_mode",
    "first_line",
    "get_submodule",
    "logits_of",
    "set_submodule",
]


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
def logits_of(output: Any) -> Tensor:
    """The main logits of a classifier's output: a tensor, ``output.logits`` or ``output[0]``.

    Inception-V3 in train mode returns ``(logits, aux_logits)``; its main logits are used.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        f"Expected the model to return logits as a Tensor, a tuple whose first element is the "
        f"logits, or an object with a .logits Tensor; got {type(output).__name__}."
    )


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule ``name``, or raise a ``ValueError`` listing close matches."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(
        f"Module {name!r} not found in {type(model).__name__}{hint}. "
        "Run `deltaft layers --model NAME` to list the module names."
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` (dotted path) with ``module``."""
    get_submodule(model, name)  # validates the name with a helpful error
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of ``model``'s first floating-point parameter or buffer."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps the given modules (objects, not names) as ``call_module`` nodes."""

    def __init__(self, leaves: Iterable[nn.Module]) -> None:
        super().__init__()
        self._leaves = {id(module) for module in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


# ------------------------------------------------------------------------------------------------
# Errors and files
# ------------------------------------------------------------------------------------------------
def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories can't be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error(error: BaseException) -> OSError | None:
    """``error`` or the OSError behind it (``torch.save`` turns a failed write into a
    RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create ``<folder>/.<name>.<random>.tmp`` exclusively, open for writing.

    Unlike ``tempfile.mkstemp`` (mode 0600) the file is created with mode 0666 less the umask,
    applied by the kernel (so no umask is read or changed), as ``open(path, "w")`` would: the
    renamed file has the mode the user's other files get.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"No free temporary name next to {path}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it to ``path``.

    Parent folders are created. The file gets mode 0666 less the umask (a replaced file's mode is
    not kept). On any error the temporary file is removed and ``path`` is left as it was.

    Raises:
        OSError: the file could not be written (disk full, read-only folder...); the message
            names ``path`` and says that it is unchanged.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        cause = _os_error(error)
        if cause is None:
            raise
        state = "is unchanged" if path.exists() else "was not created"
        raise OSError(
            cause.errno, f"Could not write {path} ({cause.strerror or cause}); {path.name} {state}"
        ) from error
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder in a new sibling ``<dst>.partial-XXXXXXXX``, then rename it to ``dst``.

    Yields the partial folder (created with the umask's mode; parents are created). When the
    block ends without error the folder is renamed to ``dst``; an empty folder already at ``dst``
    is replaced (and put back if the rename fails). On any error, the rename's included (for
    example ``dst`` appeared meanwhile, not empty), the partial folder is removed and the error
    raised: ``dst`` is either complete or not there, never half written.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    while True:
        partial = dst.with_name(f"{dst.name}.partial-{secrets.token_hex(4)}")
        try:
            partial.mkdir()
            break
        except FileExistsError:
            continue
    emptied = False
    try:
        yield partial
        if dst.is_dir() and not dst.is_symlink():
            dst.rmdir()  # only when empty: rmdir refuses a folder that holds anything
            emptied = True
        os.replace(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # our own folder, never the user's
        if emptied:
            with contextlib.suppress(OSError):
                dst.mkdir()  # give the user's empty folder back
        raise
