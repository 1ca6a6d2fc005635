"""Seeded, class-balanced subsampling and held-out splits of labelled datasets."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from deltaft.app.checks import at_least, exclusive, in_range, integer

__all__ = ["check_sampling", "check_val_split", "stratified_indices", "stratified_split"]

logger = logging.getLogger(__name__)

_SPLIT_SALT = 0x5EED  # decorrelates held-out splits from per-class subsampling with the same seed
_SAMPLE_SALT = 0x5A3B


def _by_class(targets: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(targets):
        groups[int(label)].append(index)
    return dict(sorted(groups.items()))


def _permuted(indices: list[int], seed: int, label: int, salt: int) -> list[int]:
    """``indices`` shuffled by a generator that depends only on (seed, label, salt)."""
    mask = (1 << 64) - 1  # SeedSequence takes non-negative integers; negative seeds wrap around
    rng = np.random.default_rng([salt, label & mask, seed & mask])
    return [indices[i] for i in rng.permutation(len(indices))]


def check_sampling(per_class: int | None, fraction: float | None) -> None:
    """``per_class`` (an integer >= 1) or ``fraction`` (in (0, 1]), not both; ``None`` is unset.

    The one check of these settings: :class:`~deltaft.app.config.TrainConfig` and
    :func:`~deltaft.app.data.build_datasets` both call it.

    Raises:
        SettingError: both given, ``per_class`` not an integer or < 1, ``fraction`` outside
            (0, 1].
    """
    exclusive("per_class", per_class, "fraction", fraction)
    if per_class is not None:
        integer("per_class", per_class)
        at_least("per_class", per_class, 1)
    if fraction is not None:
        in_range("fraction", fraction, 0.0, 1.0, left_open=True)


def check_val_split(val_split: float) -> None:
    """``val_split`` in [0, 1): the share of the training images held out; 0 holds out none.

    The one check of this setting: :class:`~deltaft.app.config.TrainConfig` and
    :func:`~deltaft.app.data.build_datasets` both call it.

    Raises:
        SettingError: ``val_split`` outside [0, 1).
    """
    in_range("val_split", val_split, 0.0, 1.0, right_open=True)


def stratified_indices(
    targets: Sequence[int],
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of a seeded, class-balanced subsample of a dataset with labels ``targets``.

    Each class is shuffled by a generator seeded with ``(seed, class)`` and its first ``k`` indices
    are kept, with ``k = min(per_class, n_c)`` or ``k = max(1, round(fraction * n_c))`` (halves
    rounded up). Because the shuffle does not depend on ``k``, subsamples with the same seed are
    nested: 30 per class is a subset of 60 per class, 15 % of 30 %. A class with fewer than
    ``per_class`` images keeps them all and is reported in one warning.

    Args:
        targets: the label of every sample.
        per_class: images to keep per class.
        fraction: share of each class to keep, in (0, 1].
        seed: the sampling seed.

    Returns:
        Sorted indices into ``targets``; all of them when neither ``per_class`` nor ``fraction``
        is given.

    Raises:
        SettingError: both options given, ``per_class < 1`` or ``fraction`` outside (0, 1]
            (:func:`check_sampling`).

    Example:
        >>> stratified_indices([0, 0, 0, 1, 1, 1], per_class=2, seed=0)  # doctest: +SKIP
        [0, 2, 3, 5]
    """
    check_sampling(per_class, fraction)
    if per_class is None and fraction is None:
        return list(range(len(targets)))
    keep: list[int] = []
    short: list[tuple[int, int]] = []
    for label, members in _by_class(targets).items():
        n = len(members)
        if per_class is not None:
            k = min(per_class, n)
            if n < per_class:
                short.append((label, n))
        else:
            assert fraction is not None
            k = min(n, max(1, math.floor(fraction * n + 0.5)))
        keep.extend(_permuted(members, seed, label, _SAMPLE_SALT)[:k])
    if short:
        listed = ", ".join(f"class {label}: {n}" for label, n in short[:8])
        more = ", ..." if len(short) > 8 else ""
        logger.warning(
            "per_class=%d: %d of %d classes have fewer images and keep all of them (%s%s).",
            per_class,
            len(short),
            len(_by_class(targets)),
            listed,
            more,
        )
    return sorted(keep)


def stratified_split(
    targets: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into ``(rest, held_out)``, holding out about ``fraction`` of every class.

    A class with ``n >= 2`` samples holds out ``k = clamp(round(fraction * n), 1, n - 1)`` of them
    (halves rounded up), chosen by a generator seeded with ``(seed, class)``; a class with a single
    sample stays in ``rest``. Both lists are sorted.

    ``fraction`` is an argument, not a setting: :func:`~deltaft.app.data.build_datasets` passes
    ``val_split`` once :func:`check_val_split` has checked it and found it above 0, the demo a
    share it computes. So this check names no setting (a command-line flag would be the wrong one).

    Raises:
        ValueError: ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"The held-out fraction must be in (0, 1) (0 holds out nothing, 1 everything), got "
            f"{fraction!r}."
        )
    rest: list[int] = []
    held: list[int] = []
    for label, members in _by_class(targets).items():
        n = len(members)
        k = 0 if n < 2 else min(n - 1, max(1, math.floor(fraction * n + 0.5)))
        shuffled = _permuted(members, seed, label, _SPLIT_SALT)
        held.extend(shuffled[:k])
        rest.extend(shuffled[k:])
    return sorted(rest), sorted(held)
