"""Which files of a folder tree are images: the one discovery rule of the dataset and the scanner.

Kept free of torch so the `dinov2-scan` CLI and its worker processes start quickly.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (macOS `.DS_*`, `._*`, `.ipynb_checkpoints`) are never data."""
    return name.startswith(".")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(name)


def find_images(root: str | os.PathLike) -> list[str]:
    """Paths (joined onto `root` as given) of every image below `root`, sorted, hidden entries skipped."""
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Pruning in place stops os.walk from descending into hidden folders.
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(found)
