"""The settings of one fine-tuning run: a typed dataclass, YAML in and out, unknown keys are errors.

Precedence, lowest first: the dataclass defaults, a YAML file (``--config``), then command-line
flags. The resolved configuration is written to ``RUN_DIR/config.yaml`` and can be passed back with
``--config`` to repeat a run.

Example:
    >>> cfg = TrainConfig.from_sources({"alpha": 0.1}, {"data": "imgs", "model": "resnet50",
    ...                                                  "out": "runs/a"})
    >>> cfg.alpha, cfg.epochs
    (0.1, 10)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from deltaft.app.errors import UserError
from deltaft.objective import Method

__all__ = [
    "DEFAULT_EPOCHS",
    "RUNTIME_KEYS",
    "TrainConfig",
    "flag_name",
    "load_config",
]

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["step", "exponential", "cosine"]
Preset = Literal["default", "paper"]
Amp = Literal["none", "bf16", "fp16"]
BatchNormMode = Literal["adapt", "frozen"]
Reduction = Literal["sum", "mean"]
SourceBN = Literal["running", "batch"]
AttentionMethod = Literal["exact", "reference", "taylor"]

DEFAULT_EPOCHS = 10
# Settings that change how a run executes but not what it computes (up to float round-off):
# they may differ between a run and its --resume.
RUNTIME_KEYS: frozenset[str] = frozenset(
    {
        "amp",
        "channels_last",
        "data_root",
        "device",
        "download",
        "out",
        "resume",
        "source_mkldnn",
        "workers",
    }
)
_REQUIRED = ("data", "model", "out")


def flag_name(key: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


@dataclass
class TrainConfig:
    """Every setting of ``deltaft train``; each field is the flag of the same name.

    Validated on construction (:class:`~deltaft.app.errors.UserError` names the flag and the fix).
    Values are coerced where YAML is ambiguous: ``"1e-4"`` (a string to YAML) becomes a float,
    ``"a,b"`` a list of layers.

    Attributes:
        data: image folder (``DIR/train/<class>/*`` or ``DIR/<class>/*``) or ``tv:NAME``.
        model: torchvision or timm name, or ``pkg.module:factory``.
        out: the run directory.
        weights: ``imagenet``, ``none`` (random source, for tests) or a weight file.
        method: ``l2``, ``l2sp``, ``fm`` or ``delta``.
        alpha: strength of the behavioural term (``fm``, ``delta``) or of L2-SP.
        beta: strength of ``1/2 ||head||^2`` (all methods but ``l2``).
        lr: learning rate of the backbone (and of the head unless ``head_lr`` is set).
        head_lr: learning rate of the new head; ``None`` means ``lr``.
        momentum: SGD momentum (ignored by AdamW).
        optimizer: ``sgd`` or ``adamw``.
        weight_decay: the ``l2`` method's weight decay; the other methods use none.
        batch_size: images per step (per process under ``torchrun``).
        epochs: passes over the training set; exclusive with ``iterations``; 10 when neither.
        iterations: optimizer steps in total; the last epoch stops early.
        schedule: ``step`` (lr x ``lr_gamma`` once, at ``step_at`` of training), ``exponential``
            (``lr * lr_gamma ** (t / T)``, reaching ``lr * lr_gamma`` at the end) or ``cosine``
            (to 0); the lr is updated after every step.
        step_at: fraction of the steps after which ``step`` multiplies the lr by ``lr_gamma``.
        lr_gamma: the decay factor of ``step`` and ``exponential``.
        image_size: training resolution; ``None`` is the model's pretrained size.
        preset: data transforms: ``default`` (the model's pretrained config) or ``paper``
            (``Resize((256, 256)) + RandomCrop(224) + flip``, as the reference code).
        hflip: probability of the training transform's horizontal flip; 0 turns it off (for
            digits or text, whose mirror image is another thing).
        crop_scale: smallest area fraction the ``default`` preset's ``RandomResizedCrop``
            keeps; ``None`` is 0.25. The ``paper`` preset has no such crop.
        per_class: keep N training images per class (stratified, seeded).
        fraction: keep this fraction of each class's training images (exclusive with
            ``per_class``).
        val_split: fraction of the training images held out for validation when the data has no
            ``val`` split; 0 means no validation (``best.pt`` is then the last epoch).
        layers: regularized layers of ``fm``/``delta``; ``None`` is the default rule.
        attention: a saved attention file to reuse instead of estimating one (``delta``).
        attention_epochs: epochs of the attention head's training.
        attention_batches: batches the channel-removal scores average over.
        attention_method: ``exact`` (fast, same result), ``reference`` (per-channel loop) or
            ``taylor`` (first-order approximation).
        temperature: softmax temperature of the attention.
        bn: BatchNorm during the attention head's training: ``adapt`` (reference) or ``frozen``.
        reduction: the feature-map penalty's batch reduction: ``sum`` (reference) or ``mean``.
        source_bn: the frozen source's BatchNorm while training: ``running`` statistics
            (reference) or the current ``batch``'s (removes the step-0 mismatch with the target).
        source_mkldnn: on the CPU, run the frozen source as a oneDNN copy with packed weights:
            faster steps on ResNets, more memory; the same maps up to round-off.
        head: dotted name of the classifier head; found automatically when ``None``.
        seed: seeds Python, NumPy and torch, the subsampling and the data order.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        amp: mixed precision on CUDA: ``none``, ``bf16`` or ``fp16`` (with loss scaling).
        channels_last: NHWC memory format on GPU.
        workers: DataLoader worker processes.
        resume: continue the run in ``out`` from ``checkpoints/last.pt``.
        download: let torchvision datasets (``tv:NAME``) download.
        data_root: where ``tv:NAME`` datasets live.
    """

    data: str
    model: str
    out: str
    weights: str = "imagenet"
    method: Method = "delta"
    alpha: float = 0.01
    beta: float = 0.01
    lr: float = 0.01
    head_lr: float | None = None
    momentum: float = 0.9
    optimizer: Optimizer = "sgd"
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int | None = None
    iterations: int | None = None
    schedule: Schedule = "step"
    step_at: float = 2 / 3
    lr_gamma: float = 0.1
    image_size: int | None = None
    preset: Preset = "default"
    hflip: float = 0.5
    crop_scale: float | None = None
    per_class: int | None = None
    fraction: float | None = None
    val_split: float = 0.0
    layers: list[str] | None = None
    attention: str | None = None
    attention_epochs: int = 10
    attention_batches: int = 4
    attention_method: AttentionMethod = "exact"
    temperature: float = 5.0
    bn: BatchNormMode = "adapt"
    reduction: Reduction = "sum"
    source_bn: SourceBN = "running"
    source_mkldnn: bool = False
    head: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: Amp = "none"
    channels_last: bool = False
    workers: int = 2
    resume: bool = False
    download: bool = False
    data_root: str | None = field(default=None)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for key in _REQUIRED:
            if not getattr(self, key):
                raise UserError(f"{flag_name(key)} must not be empty.")
        if self.epochs is not None and self.iterations is not None:
            raise UserError(
                f"Give either --epochs or --iterations, not both (got epochs={self.epochs}, "
                f"iterations={self.iterations})."
            )
        if self.epochs is None and self.iterations is None:
            self.epochs = DEFAULT_EPOCHS
        if self.per_class is not None and self.fraction is not None:
            raise UserError(
                f"Give either --per-class or --fraction, not both (got per_class="
                f"{self.per_class}, fraction={self.fraction})."
            )
        _at_least("alpha", self.alpha, 0.0)
        _at_least("beta", self.beta, 0.0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _above("lr", self.lr, 0.0)
        if self.head_lr is not None:
            _above("head_lr", self.head_lr, 0.0)
        _in_range("momentum", self.momentum, 0.0, 1.0, right_open=True)
        _at_least("batch_size", self.batch_size, 1)
        if self.epochs is not None:
            _at_least("epochs", self.epochs, 1)
        if self.iterations is not None:
            _at_least("iterations", self.iterations, 1)
        _in_range("step_at", self.step_at, 0.0, 1.0, left_open=True, right_open=True)
        _in_range("lr_gamma", self.lr_gamma, 0.0, 1.0, left_open=True)
        if self.image_size is not None:
            _at_least("image_size", self.image_size, 8)
        if self.per_class is not None:
            _at_least("per_class", self.per_class, 1)
        if self.fraction is not None:
            _in_range("fraction", self.fraction, 0.0, 1.0, left_open=True)
        _in_range("val_split", self.val_split, 0.0, 1.0, right_open=True)
        _in_range("hflip", self.hflip, 0.0, 1.0)
        if self.crop_scale is not None:
            _in_range("crop_scale", self.crop_scale, 0.0, 1.0, left_open=True)
            if self.preset == "paper":
                raise UserError(
                    "--crop-scale sets the default preset's RandomResizedCrop; the paper preset "
                    "crops a fixed size. Drop --crop-scale or use --preset default."
                )
        if self.layers is not None and (
            not self.layers or len(set(self.layers)) != len(self.layers)
        ):
            raise UserError(
                f"--layers must name distinct modules, got {self.layers}; e.g. --layers "
                "layer1.2.conv3,layer2.3.conv3 (see `deltaft layers --model NAME`)."
            )
        _at_least("attention_epochs", self.attention_epochs, 0)
        _at_least("attention_batches", self.attention_batches, 1)
        _above("temperature", self.temperature, 0.0)
        _at_least("seed", self.seed, 0)
        _at_least("workers", self.workers, 0)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise UserError(
                    f"--device {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps."
                ) from None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """Every setting's name, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(
        cls,
        *sources: Mapping[str, Any] | None,
        origin: str = "the configuration",
    ) -> TrainConfig:
        """Merge mappings, later ones winning, and build a validated config.

        Typically ``from_sources(load_config(path), cli_overrides)``. ``epochs`` and
        ``iterations`` replace each other: a later source that sets one drops the other set by
        an earlier source, so ``--iterations`` overrides a file's ``epochs``. ``None`` values
        mean "not given" (they do not reset a setting).

        Raises:
            UserError: an unknown key (the valid ones are listed), a missing required setting or
                an invalid value.
        """
        merged: dict[str, Any] = {}
        for source in sources:
            if not source:
                continue
            values = _normalise_keys(source, origin)
            given = {k: v for k, v in values.items() if v is not None}
            for pair in (("epochs", "iterations"), ("per_class", "fraction")):
                for key, other in (pair, pair[::-1]):
                    if key in given and other not in given:
                        merged.pop(other, None)
            merged.update(given)
        missing = [flag_name(k) for k in _REQUIRED if merged.get(k) in (None, "")]
        if missing:
            raise UserError(
                f"Missing required setting(s) {', '.join(missing)}; pass them as flags or in "
                "--config FILE.yaml."
            )
        return cls(**merged)

    # -- output ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (safe for YAML and ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML, readable back by :func:`load_config`."""
        header = "# deltaft resolved configuration: `deltaft train --config THIS_FILE`\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def differences(
        self, other: Mapping[str, Any], *, ignore: frozenset[str] = RUNTIME_KEYS
    ) -> dict[str, tuple[Any, Any]]:
        """``{key: (other's value, this value)}`` for each setting that differs, ``ignore`` aside.

        ``other`` is a stored configuration (e.g. a checkpoint's); keys it lacks take this
        config's value, keys this version does not know are ignored.
        """
        mine = self.to_dict()
        theirs = {**mine, **_normalise_keys(other, "the stored configuration", strict=False)}
        return {
            key: (theirs[key], mine[key])
            for key in mine
            if key not in ignore and theirs[key] != mine[key]
        }


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file into a dict of settings (``yaml.safe_load``).

    Keys may use ``-`` or ``_`` (``batch-size`` = ``batch_size``). An empty file is ``{}``.

    Raises:
        UserError: the file is missing or unreadable, is not YAML, is not a mapping, or has an
            unknown key (the message lists the valid keys).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"Config file {path} does not exist; check the --config path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"Config file {path} cannot be read: {error}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise UserError(f"Config file {path} is not valid YAML{at}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"Config file {path} must be a mapping of settings (key: value), got "
            f"{type(data).__name__}."
        )
    return _normalise_keys(data, f"config file {path}")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _normalise_keys(
    values: Mapping[str, Any], origin: str, *, strict: bool = True
) -> dict[str, Any]:
    """``values`` with ``-`` in keys turned into ``_``; unknown keys raise (or are dropped)."""
    valid = TrainConfig.keys()
    out: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in valid:
            out[name] = value
        else:
            unknown.append(str(key))
    if unknown and strict:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UserError(
            f"Unknown setting(s) {', '.join(hints)} in {origin}; valid settings: "
            f"{', '.join(sorted(valid))}."
        )
    return out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint``, or a :class:`UserError`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, options[0])
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise UserError(
                f"{flag_name(name)} must be one of {', '.join(map(str, choices))}; got {value!r}."
            )
        return value
    if origin is list:
        return _coerce_list(name, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{flag_name(name)} must be true or false, got {value!r}.")
    if hint is int:
        return _coerce_int(name, value)
    if hint is float:
        return _coerce_float(name, value)
    if hint is str:
        if isinstance(value, (str, Path)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{flag_name(name)} must be a string, got {value!r}.")
    raise TypeError(f"Unsupported field type {hint!r} for {name}.")  # a bug, not user input


def _coerce_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise UserError(f"{flag_name(name)} must be an integer, got {value!r}.")


def _coerce_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise UserError(f"{flag_name(name)} must be a number, got {value!r}.")


def _coerce_list(name: str, value: Any) -> list[str]:
    items: list[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [part.strip() if isinstance(part, str) else part for part in value]
    else:
        raise UserError(f"{flag_name(name)} must be a list of names or 'a,b,c', got {value!r}.")
    if not all(isinstance(part, str) and part for part in items):
        raise UserError(f"{flag_name(name)} must be non-empty names, got {value!r}.")
    return items


def _at_least(name: str, value: float, low: float) -> None:
    if not value >= low:  # also rejects NaN
        raise UserError(f"{flag_name(name)} must be >= {low:g}, got {value}.")


def _above(name: str, value: float, low: float) -> None:
    if not value > low:
        raise UserError(f"{flag_name(name)} must be > {low:g}, got {value}.")


def _in_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    left_open: bool = False,
    right_open: bool = False,
) -> None:
    ok_low = value > low if left_open else value >= low
    ok_high = value < high if right_open else value <= high
    if not (ok_low and ok_high) or math.isnan(value):
        interval = f"{'(' if left_open else '['}{low:g}, {high:g}{')' if right_open else ']'}"
        raise UserError(f"{flag_name(name)} must be in {interval}, got {value}.")
