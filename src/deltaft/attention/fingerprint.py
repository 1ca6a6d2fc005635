"""Content hashes that tie an attention file to the weights and the batches it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltaft.attention._common import Batch, take_batches

__all__ = ["batches_fingerprint", "data_fingerprint", "model_fingerprint"]


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of ``model``'s weights: 16 hex digits of a SHA-256.

    The hash covers every ``state_dict()`` entry in sorted order: its name, dtype, shape and bytes
    (on the CPU, contiguous). Equal weights give equal fingerprints, whatever the device, the
    mode or the Python object.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> model_fingerprint(a) == model_fingerprint(b), len(model_fingerprint(a))
        (True, 16)
    """
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0")
        if isinstance(value, Tensor):
            _hash_tensor(digest, value)
        else:  # extra state
            digest.update(repr(value).encode() + b"\0")
    return digest.hexdigest()[:16]


def data_fingerprint(loader: Iterable[Any], n_batches: int) -> str:
    """Content hash of the first ``n_batches`` ``(x, y)`` batches: 16 hex digits of a SHA-256.

    Only meaningful for a loader that yields the same batches each time (no shuffling);
    :func:`~deltaft.attention.estimate_channel_attention` hashes the very batches it scores.
    """
    return batches_fingerprint(take_batches(loader, n_batches))


def batches_fingerprint(batches: Sequence[Batch]) -> str:
    """Content hash of ``batches``: dtype, shape and bytes of each ``x`` then ``y``, in order."""
    digest = hashlib.sha256()
    for x, y in batches:
        _hash_tensor(digest, x)
        _hash_tensor(digest, y)
    return digest.hexdigest()[:16]


def _hash_tensor(digest: Any, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
