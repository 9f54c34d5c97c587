"""Seeded stratified splits: k folds and a single held-out fraction.

Each class's indices are shuffled with ``numpy.random.default_rng(seed)`` and dealt round-robin
to the folds; the dealing continues where the previous class stopped, so fold sizes differ by at
most one and each class's count differs by at most one between folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels are empty")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError("labels contain negative (unlabeled) entries; a stratified split needs class labels")
    return y


def check_min_class_count(
    labels, minimum: int, class_names: Sequence[str] | None = None, what: str = "folds"
):
    """Raise ValueError naming every class with fewer than ``minimum`` samples."""
    y = _labels(labels)
    classes, counts = np.unique(y, return_counts=True)
    small = [(int(c), int(n)) for c, n in zip(classes, counts) if n < minimum]
    if small:
        desc = ", ".join(
            f"{class_names[c] if class_names is not None and c < len(class_names) else c!s} ({n})"
            for c, n in small
        )
        raise ValueError(
            f"every class needs at least {minimum} samples for {minimum} {what}; too few in: {desc}. "
            f"Use fewer {what} or add images to these classes."
        )


def fold_assignment(labels, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id in ``[0, n_folds)`` of each sample (see module doc for the dealing rule)."""
    y = _labels(labels)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = (offset + np.arange(len(idx))) % n_folds
        offset = (offset + len(idx)) % n_folds
    return fold


def stratified_kfold_indices(
    labels, n_folds: int = 5, seed: int = 0, class_names: Sequence[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` (train indices, test indices) pairs; the test parts partition the samples.

    Raises ValueError when a class has fewer than ``n_folds`` samples (it would be missing from
    some test folds), naming the class (by ``class_names`` when given).
    """
    check_min_class_count(labels, n_folds, class_names)
    fold = fold_assignment(labels, n_folds, seed)
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(n_folds)]


def stratified_split(labels, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split into (kept, held-out) index arrays with about ``fraction`` of every class held out.

    Each class with at least 2 samples keeps at least one and holds out at least one.
    """
    y = _labels(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        if len(idx) < 2:
            continue
        n_out = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        held.append(idx[:n_out])
    if not held:
        raise ValueError("cannot hold out samples: every class has fewer than 2 samples")
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(y), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx
