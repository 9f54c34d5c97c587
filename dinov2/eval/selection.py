"""Choosing example images: a few seeded cells of each class (attention maps, galleries)."""

from __future__ import annotations

import os

import numpy as np


def sample_images_per_class(root: str | os.PathLike, per_class: int = 1, seed: int = 0) -> list[str]:
    """Paths of `per_class` seeded random images of each class of `root`, classes in sorted order.

    An unlabeled folder counts as one class. A class with fewer images gives all of them.
    """
    from dinov2.data.datasets import CellImageDataset

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    dataset = CellImageDataset(os.fspath(root), labeled=None)
    rng = np.random.default_rng(seed)
    targets = np.asarray(dataset.targets)
    paths = dataset.paths
    picked: list[str] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False)
        picked += [paths[i] for i in sorted(chosen)]
    return picked
