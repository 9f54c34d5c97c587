"""The per-root result cache of `dinov2-scan`: one JSON file per dataset root.

Entries are keyed on the file's path relative to the root and hold (size, mtime_ns, status,
detail), so a re-scan decodes only new or changed files; the header records the decoding settings
(cache format and version, the root, ``max_pixels`` and the Pillow version) and a cache made with
other settings is ignored. The file lives under ``$DINOV2_CACHE_DIR/scan`` (default
``~/.cache/dinov2-cells/scan``), named by the SHA-1 of the root's absolute path, and is replaced
atomically; an unreadable or unwritable cache only costs a warning and a full decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import PIL

from dinov2.data.image_io import PROBLEMS
from dinov2.utils.files import atomic_write

logger = logging.getLogger("dinov2")

# The status of a file that decodes; any other status is one of image_io.PROBLEMS.
OK = "ok"
CACHE_FORMAT = "dinov2-scan-cache"
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$DINOV2_CACHE_DIR/scan`, or `~/.cache/dinov2-cells/scan`."""
    base = os.environ.get("DINOV2_CACHE_DIR")
    return Path(base) / "scan" if base else Path.home() / ".cache" / "dinov2-cells" / "scan"


def cache_file(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of `root`: `<cache_dir>/<sha1 of the absolute root path>.json`."""
    key = hashlib.sha1(os.path.abspath(os.fspath(root)).encode("utf-8")).hexdigest()
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.json"


# relative path -> (size, mtime_ns, status, detail)
CacheEntries = dict[str, tuple[int, int, str, str]]


def _cache_header(root: str, max_pixels: int) -> dict:
    # A different size limit or Pillow version can change a verdict, so either invalidates the cache.
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "root": os.path.abspath(root),
        "max_pixels": int(max_pixels),
        "pillow": PIL.__version__,
    }


def _read_cache_json(path: Path) -> dict | None:
    """The parsed cache file, None when absent; a file that fails to parse is ignored with a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("not a scan cache (no 'entries' mapping)")
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        logger.warning("ignoring unreadable scan cache %s (%s); every file will be decoded again", path, exc)
        return None


def load_cache(root: str, cache_dir: str | os.PathLike | None, max_pixels: int) -> CacheEntries:
    """Cached verdicts of `root`'s files, or {} when there is no usable cache."""
    path = cache_file(root, cache_dir)
    data = _read_cache_json(path)
    if data is None:
        return {}
    header = {k: data.get(k) for k in _cache_header(root, max_pixels)}
    if header != _cache_header(root, max_pixels):
        logger.info("scan cache %s was made with other settings (%s); decoding again", path, header)
        return {}
    entries: CacheEntries = {}
    valid_status = {OK, *PROBLEMS}
    for rel, value in data["entries"].items():
        if (
            isinstance(value, list)
            and len(value) == 4
            and all(isinstance(v, int) for v in value[:2])
            and value[2] in valid_status
            and isinstance(value[3], str)
        ):
            entries[rel] = (value[0], value[1], value[2], value[3])
        else:
            logger.warning("ignoring malformed scan cache %s (entry %r); decoding again", path, rel)
            return {}
    return entries


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace.

    A cache that cannot be written (read-only home, full disk) only costs a warning: the next
    scan decodes again.
    """
    try:
        atomic_write(path, json.dumps(data, separators=(",", ":")))  # dumps uses the C encoder, dump does not
    except OSError as exc:
        logger.warning("could not write scan cache %s (%s); the next scan decodes again", path, exc)


def save_cache(
    root: str, cache_dir: str | os.PathLike | None, max_pixels: int, entries: CacheEntries
) -> None:
    """Replace `root`'s cache with `entries` (atomically; a failed write only warns)."""
    data = _cache_header(root, max_pixels)
    data["entries"] = {rel: list(value) for rel, value in sorted(entries.items())}
    _write_json_atomic(cache_file(root, cache_dir), data)


def forget_in_cache(root: str, relative_paths: Iterable[str], cache_dir: str | os.PathLike | None) -> None:
    """Drop `relative_paths` from `root`'s cache (after they were moved away)."""
    path = cache_file(root, cache_dir)
    data = _read_cache_json(path)
    if data is None:
        return
    gone = set(relative_paths)
    # The header (settings, Pillow version) is kept as it was: only the entries change.
    data["entries"] = {rel: v for rel, v in data["entries"].items() if rel not in gone}
    _write_json_atomic(path, data)
