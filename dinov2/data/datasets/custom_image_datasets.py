"""Image-folder dataset over one or several roots of cell images, labeled or not.

This is the dataset the cell fork's users configure with `train.dataset_path` (one path or a
list): every image below each root is found recursively, a fraction of each root can be left
out, files can be checked for corruption before use, and class folders give labels the way
torchvision's `ImageFolder` does (the evaluation tools rely on `classes`, `class_to_idx` and
`targets`). Decoding problems that slip through at training time are logged once per file and
replaced by another sample, until too many fail.
"""

from __future__ import annotations

import logging
import numbers
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinov2.data.files import IMAGE_EXTENSIONS, find_images, is_hidden, is_image_file  # noqa: F401 (re-exported)
from dinov2.data.image_io import ImageDecodeError, load_rgb

logger = logging.getLogger("dinov2")

UNLABELED = -1


def class_of(root: str, path: str) -> str | None:
    """The first-level folder of `path` under `root`, or None for an image lying in `root` itself."""
    relative = os.path.relpath(path, root).split(os.sep)
    return relative[0] if len(relative) > 1 else None


def ignored_count(n_files: int, fraction: float) -> int:
    """How many of a root's `n_files` are left out for `fraction`: floor(n * fraction)."""
    return int(np.floor(n_files * fraction + 1e-9))


def keep_subset(paths: list[str], fraction: float, seed: int, root: str) -> list[str]:
    """Drop `ignored_count(len(paths), fraction)` files of one root, chosen reproducibly.

    The random choice is seeded by `seed` and the root's own path, so adding, removing or
    reordering *other* roots never changes which files of this root are kept.
    """
    n_ignore = ignored_count(len(paths), fraction)
    if n_ignore == 0:
        return paths
    root_key = zlib.crc32(os.path.abspath(root).encode("utf-8"))
    rng = np.random.default_rng([int(seed), root_key])
    dropped = set(rng.choice(len(paths), size=n_ignore, replace=False).tolist())
    return [p for i, p in enumerate(paths) if i not in dropped]


def _as_list(value: Any, n: int, name: str) -> list[float]:
    if isinstance(value, numbers.Real):  # also numpy scalars, which are not `float`
        values = [float(value)] * n
    else:
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ValueError(f"{name} must be a number or a list with one number per root, got {value!r}")
        values = [float(v) for v in value]
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} values but there are {n} dataset roots")
    for v in values:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    return values


class CellImageDataset(Dataset):
    """Images below one or several roots; `ds[i] -> (transform(image), target)`.

    Args:
        root: a folder or a list of folders, searched recursively for jpg/jpeg/png/tif/tiff/bmp
            (any case); hidden files and folders are skipped.
        transform: applied to the RGB PIL image.
        target_transform: applied to the integer target.
        ignore_fraction: share of each root left out (one value, or one per root): floor(n * f)
            of a root's n images, chosen reproducibly from `seed` and the root's path (before
            the corruption check, so the check never changes which files are kept).
        seed: seed of the ignored subset.
        labeled: None detects class folders (labeled when every root holds its images in
            first-level class folders), True requires them, False ignores them (targets -1).
        check_corrupted: fully decode every file first (parallel, cached per root; see
            `dinov2.data.scan`) and drop the broken ones.
        scan_workers: worker processes of that check (default: all cores).
        max_failed_fraction: at access time a file that fails to decode is replaced by another
            sample; once more than this share of the dataset has failed, a RuntimeError stops.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        ignore_fraction: float | Sequence[float] = 0.0,
        seed: int = 0,
        labeled: bool | None = None,
        check_corrupted: bool = False,
        scan_workers: int | None = None,
        max_failed_fraction: float = 0.01,
    ):
        roots = [os.fspath(root)] if isinstance(root, str | os.PathLike) else [os.fspath(r) for r in root]
        if not roots:
            raise ValueError("no dataset root given (dataset_path is empty)")
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
        fractions = _as_list(ignore_fraction, len(roots), "ignore_fraction")
        self.roots = roots
        self.transform = transform
        self.target_transform = target_transform
        self.max_failed_fraction = float(max_failed_fraction)

        discovered = [self._discover(r) for r in roots]
        # Ignoring comes first, so the kept subset of a root depends only on its files, the
        # fraction and the seed: the corruption check then removes broken files from that same
        # subset instead of reshuffling it.
        per_root = [keep_subset(p, f, seed, r) for p, f, r in zip(discovered, fractions, roots)]
        if check_corrupted:
            per_root = self._drop_corrupted(per_root, scan_workers)

        # Layout and classes come from the folders as found, before ignoring or dropping files, so a
        # class whose few images are all ignored or broken keeps its index (train and eval datasets
        # over the same tree must agree on class_to_idx).
        layouts = [all(class_of(r, p) is not None for p in paths) for r, paths in zip(roots, discovered)]
        if labeled is None:
            labeled = all(layouts)
        elif labeled and not all(layouts):
            bad = [r for r, ok in zip(roots, layouts) if not ok]
            raise ValueError(
                f"labels requested but {', '.join(bad)} is not a class-folder dataset: images must lie in "
                "one sub-folder per class (e.g. root/neutrophil/x.jpg), not directly in the root"
            )
        self.labeled = bool(labeled)
        if self.labeled:
            self.classes = sorted({class_of(r, p) for r, paths in zip(roots, discovered) for p in paths})
        else:
            self.classes = []
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [
            (p, self.class_to_idx[class_of(r, p)] if self.labeled else UNLABELED)
            for r, paths in zip(roots, per_root)
            for p in paths
        ]
        if not self.samples:
            raise ValueError(f"no images left in {', '.join(roots)} after ignoring and corruption checks")
        self._failed: dict[int, str] = {}

    @staticmethod
    def _discover(root: str) -> list[str]:
        if not os.path.exists(root):
            raise FileNotFoundError(f"dataset path does not exist: {root}")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"dataset path is not a folder: {root}")
        paths = find_images(root)
        if not paths:
            raise ValueError(
                f"no images found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return paths

    def _drop_corrupted(self, per_root: list[list[str]], workers: int | None) -> list[list[str]]:
        from dinov2.data.scan import scan_images  # the scanner is only needed when asked for

        report = scan_images(self.roots, workers=workers)
        if report.n_broken:
            logger.warning("corruption check: %s", report.summary(max_paths=20))
        ok = set(report.ok)
        return [[p for p in paths if p in ok] for paths in per_root]

    @property
    def paths(self) -> list[str]:
        """The image paths, in sample order (a new list built from `samples` on each access)."""
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        """The class index of each sample, -1 when unlabeled (a new list on each access)."""
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample `index` (raises `ImageDecodeError` when it cannot be decoded)."""
        return load_rgb(self.samples[index][0])

    def _record_failure(self, index: int, error: ImageDecodeError) -> None:
        if index not in self._failed:
            self._failed[index] = error.problem
            logger.warning("skipping unreadable image %s; another sample replaces it", error)
        if len(self._failed) > self.max_failed_fraction * len(self.samples):
            examples = ", ".join(self.samples[i][0] for i in list(self._failed)[:5])
            raise RuntimeError(
                f"{len(self._failed)} of {len(self.samples)} images failed to decode "
                f"({len(self._failed) / len(self.samples):.2%} > max_failed_fraction "
                f"{self.max_failed_fraction:.2%}), e.g. {examples}. "
                "Run `dinov2-scan` on the data (or set train.check_corrupted=true) to find them."
            )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for step in range(n):
            candidate = (index + step) % n  # deterministic replacement: the next decodable sample
            if candidate in self._failed:
                continue
            try:
                image = self.load_image(candidate)
            except ImageDecodeError as error:
                self._record_failure(candidate, error)
                continue
            target = self.samples[candidate][1]
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise RuntimeError(f"no image of {', '.join(self.roots)} can be decoded")

    def __repr__(self) -> str:
        labels = f", {len(self.classes)} classes" if self.labeled else ", unlabeled"
        return f"CellImageDataset({len(self)} images in {len(self.roots)} root(s){labels})"
