"""The :class:`ChannelAttention` value object and its file format.

A file is safetensors (no code runs on load): tensors ``weights/<layer>`` and ``scores/<layer>``,
and the other fields JSON-encoded in the metadata, with ``"format": "deltaft.attention/1"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from deltaft._utils import atomic_write, get_submodule
from deltaft.attention._common import check_temperature
from deltaft.attention.fingerprint import model_fingerprint

__all__ = ["ChannelAttention"]

_FORMAT = "deltaft.attention/1"
_METADATA_KEYS = (
    "layers",
    "temperature",
    "n_batches",
    "model_fingerprint",
    "data_fingerprint",
    "method",
)
# Files written before the training split (or the prefix tokens) were recorded lack them: read
# as "" (and 0: every token was scored then).
_OPTIONAL_KEYS = ("dataset_fingerprint", "prefix_tokens")
_RERUN_HINT = "re-run `deltaft attention` for this model, data and layers"


@dataclass(frozen=True, eq=False)
class ChannelAttention:
    """Per-layer channel weights for DELTA, with what they were computed from.

    Attributes:
        weights: ``{layer: w (C,)}``, ``w >= 0`` and ``sum(w) = 1`` per layer.
        scores: ``{layer: delta (C,)}``, the raw removal scores the weights come from.
        temperature: softmax temperature ``T`` used (``inf`` for uniform attention).
        n_batches: number of batches the scores average over (0 for uniform attention).
        model_fingerprint: :func:`model_fingerprint` of the source network (its original head
            included), ``""`` when the weights are not tied to a model (uniform).
        data_fingerprint: content hash of the scored batches, ``""`` when none.
        method: how the scores were computed (``exact``, ``reference``, ``taylor``, ``uniform``).
        dataset_fingerprint: content hash of the training split the batches were drawn from, as
            :mod:`deltaft.app` computes it (file names, sizes and labels), so that a file can
            be checked against the data it is used with; ``""`` when not recorded.
        prefix_tokens: the leading tokens of ``(B, N, C)`` layers left out of the scores (one
            count, or by layer name), as :func:`~deltaft.attention.channel_removal_scores`
            took them; 0 when every token was scored.

    A saved file must say where it came from: only a ``uniform`` one (``w = 1/C`` in every
    layer, no batches) may lack the model and data fingerprints; :meth:`save` and :meth:`load`
    refuse any other without them.
    """

    weights: dict[str, Tensor]
    scores: dict[str, Tensor]
    temperature: float
    n_batches: int
    model_fingerprint: str
    data_fingerprint: str
    method: str
    dataset_fingerprint: str = ""
    prefix_tokens: int | dict[str, int] = 0

    def __post_init__(self) -> None:
        if not self.weights or list(self.weights) != list(self.scores):
            raise ValueError(
                "weights and scores must name the same non-empty list of layers, got "
                f"{list(self.weights)} and {list(self.scores)}."
            )
        for name, w in self.weights.items():
            delta = self.scores[name]
            if w.dim() != 1 or w.numel() == 0 or delta.shape != w.shape:
                raise ValueError(
                    f"Layer {name!r}: weights and scores must both have shape (C,), got "
                    f"{tuple(w.shape)} and {tuple(delta.shape)}."
                )
            total = float(w.double().sum())
            if not (bool((w >= 0).all()) and abs(total - 1.0) <= 1e-4):
                raise ValueError(
                    f"Layer {name!r}: weights must be >= 0 and sum to 1, got sum {total:.6g}; "
                    "normalise them (attention_from_scores does)."
                )
        check_temperature(self.temperature)
        counts = (
            self.prefix_tokens.values()
            if isinstance(self.prefix_tokens, dict)
            else [self.prefix_tokens]
        )
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"prefix_tokens must be integers >= 0, got {self.prefix_tokens!r}.")
        if self.n_batches < 0:
            raise ValueError(f"n_batches must be >= 0, got {self.n_batches}.")

    @property
    def layers(self) -> list[str]:
        """Layer names, in order."""
        return list(self.weights)

    @property
    def channels(self) -> dict[str, int]:
        """``{layer: C}``."""
        return {name: w.numel() for name, w in self.weights.items()}

    @classmethod
    def uniform(cls, channels: Mapping[str, int]) -> ChannelAttention:
        """Uniform attention ``w = 1/C`` (scores 0), tied to no model or data.

        Example:
            >>> ChannelAttention.uniform({"layer4": 4}).weights["layer4"]
            tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        for name, c in channels.items():
            if c < 1:
                raise ValueError(f"Layer {name!r} needs >= 1 channel, got {c}.")
        return cls(
            weights={name: torch.full((c,), 1.0 / c) for name, c in channels.items()},
            scores={name: torch.zeros(c) for name, c in channels.items()},
            temperature=math.inf,
            n_batches=0,
            model_fingerprint="",
            data_fingerprint="",
            method="uniform",
        )

    def check_compatible(
        self,
        layers: Sequence[str],
        channels: Mapping[str, int] | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """Raise ``ValueError`` unless these weights fit the given layers, channels and model.

        Args:
            layers: the layers to regularize; must be exactly the attention's layers (any order).
            channels: ``{layer: C}`` of the model, for the layers it knows.
            model_fingerprint: the source network's :func:`model_fingerprint`; not checked
                when ``None`` or when the attention is tied to no model (uniform).
        """
        missing = [name for name in layers if name not in self.weights]
        extra = [name for name in self.weights if name not in set(layers)]
        if missing or extra:
            raise ValueError(
                f"The attention covers layers {self.layers}, but layers {list(layers)} were "
                f"requested (missing: {missing}, extra: {extra}); use the attention's layers or "
                f"{_RERUN_HINT}."
            )
        for name, c in (channels or {}).items():
            if name in self.weights and self.channels[name] != c:
                raise ValueError(
                    f"Layer {name!r} has {c} channels in the model but {self.channels[name]} in "
                    f"the attention; {_RERUN_HINT}."
                )
        if model_fingerprint is not None and self.model_fingerprint not in ("", model_fingerprint):
            raise ValueError(
                f"The attention was estimated for model {self.model_fingerprint}, but this model "
                f"is {model_fingerprint} (other weights); {_RERUN_HINT}."
            )

    def check_provenance(self) -> None:
        """Raise ``ValueError`` unless the fingerprints say where the weights came from.

        A ``uniform`` attention must be uniform (``w = 1/C``, ``n_batches = 0``); any other
        needs a model and a data fingerprint, without which nothing could be checked.
        """
        if self.method == "uniform":
            skewed = [
                name
                for name, w in self.weights.items()
                if not torch.allclose(w.double(), torch.full_like(w.double(), 1.0 / w.numel()))
            ]
            if skewed or self.n_batches != 0:
                raise ValueError(
                    f"The attention says it is uniform, but layers {skewed} have unequal weights "
                    f"or n_batches is {self.n_batches} (not 0); it was altered, {_RERUN_HINT}."
                )
            return
        if not self.model_fingerprint or not self.data_fingerprint:
            raise ValueError(
                f"The {self.method!r} attention has no model or data fingerprint (model "
                f"{self.model_fingerprint!r}, data {self.data_fingerprint!r}); only a uniform "
                f"attention may lack them: {_RERUN_HINT}."
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file, atomically (temporary file, then ``os.replace``).

        Tensors ``weights/<layer>`` and ``scores/<layer>``; the other fields, JSON-encoded, in the
        file's metadata, with ``"format": "deltaft.attention/1"``.

        Raises:
            ValueError: see :meth:`check_provenance`.
        """
        self.check_provenance()
        path = Path(path)
        tensors = {}
        for name in self.layers:
            tensors[f"weights/{name}"] = self.weights[name].detach().cpu().contiguous()
            tensors[f"scores/{name}"] = self.scores[name].detach().cpu().contiguous()
        metadata = {
            "format": _FORMAT,
            "layers": json.dumps(self.layers),
            "temperature": json.dumps(self.temperature),
            "n_batches": json.dumps(self.n_batches),
            "model_fingerprint": json.dumps(self.model_fingerprint),
            "data_fingerprint": json.dumps(self.data_fingerprint),
            "method": json.dumps(self.method),
            "dataset_fingerprint": json.dumps(self.dataset_fingerprint),
            "prefix_tokens": json.dumps(self.prefix_tokens),
        }
        atomic_write(path, lambda handle: handle.write(save(tensors, metadata=metadata)))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: nn.Module | None = None,
        layers: Sequence[str] | None = None,
        channels: Mapping[str, int] | None = None,
        expected_fingerprint: str | None = None,
    ) -> ChannelAttention:
        """Read a file written by :meth:`save` (safetensors: no code is executed).

        Args:
            path: the file.
            model: the source network the attention will be used with: every layer must exist in
                it, ``nn.Conv2d`` / ``nn.BatchNorm2d`` layers must have the stored channel
                count, and its :func:`model_fingerprint` must match (unless the file is uniform).
            layers: when given, must be exactly the stored layers.
            channels: when given, ``{layer: C}`` that must match.
            expected_fingerprint: when given, the source's fingerprint that must match.

        Raises:
            ValueError: not a deltaft attention file, a file without the fingerprints its
                method needs (:meth:`check_provenance`), or any check above fails.
            FileNotFoundError: no file at ``path``.
        """
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}); {_RERUN_HINT}."
            ) from error
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a deltaft attention file: format {metadata.get('format')!r}, "
                f"expected {_FORMAT!r}; {_RERUN_HINT}."
            )
        try:
            fields = {key: json.loads(metadata[key]) for key in _METADATA_KEYS}
            fields.update({k: json.loads(metadata[k]) for k in _OPTIONAL_KEYS if k in metadata})
            names: list[str] = fields.pop("layers")
            attention = cls(
                weights={name: tensors[f"weights/{name}"] for name in names},
                scores={name: tensors[f"scores/{name}"] for name in names},
                **fields,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is a corrupt deltaft attention file (missing or malformed {error}); "
                f"{_RERUN_HINT}."
            ) from error
        if not all(isinstance(v, str) for v in _strings(attention)):
            raise ValueError(f"{path} is a corrupt deltaft attention file; {_RERUN_HINT}.")
        try:
            attention.check_provenance()
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if model is not None:
            known = {}
            for name in attention.layers:
                module = get_submodule(model, name)
                if isinstance(module, nn.Conv2d):
                    known[name] = module.out_channels
                elif isinstance(module, nn.BatchNorm2d):
                    known[name] = module.num_features
            attention.check_compatible(attention.layers, known, model_fingerprint(model))
        if layers is not None or channels is not None or expected_fingerprint is not None:
            attention.check_compatible(
                attention.layers if layers is None else layers, channels, expected_fingerprint
            )
        return attention


def _strings(attention: ChannelAttention) -> tuple[object, ...]:
    """The fields that must be strings (JSON could give any type)."""
    return (
        attention.model_fingerprint,
        attention.data_fingerprint,
        attention.method,
        attention.dataset_fingerprint,
    )
