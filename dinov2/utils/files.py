"""Atomic file writes: the one write-then-rename every writer of the package uses.

A reader (another process, a resumed run, a crash) only ever sees the old file or the complete new
one: the data goes to a hidden temporary file in the same folder (same file system, so the rename
is atomic), is flushed to disk with ``fsync``, and then replaces the target with ``os.replace``;
the folder is fsynced too, so the rename itself survives a power cut. When writing fails, the
temporary file is removed and the old file is left untouched.

The temporary file is created with mode ``0o666`` filtered by the process umask, as ``open`` would
create the target (``tempfile.mkstemp`` would give 0600 and hide results from the rest of the team).

Example::

    atomic_write("out/metrics.json", json.dumps(metrics))
    atomic_torch_save(state, "run/last.pth")
    with atomic_path("out/curves.png") as tmp:   # any writer that takes a path
        fig.savefig(tmp)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_folder(folder: Path) -> None:
    # Not every platform or file system lets a folder be opened or fsynced; the rename already
    # happened, so this is best effort.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temporary_sibling(path: Path) -> Path:
    """Create (exclusively) an empty hidden file next to ``path`` and return its name.

    The name keeps ``path``'s suffix so writers that pick a format or append an extension from the
    name (``np.savez``, ``savefig``, PIL) treat it like the target.
    """
    while True:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
        try:
            # 0o666 here is filtered by the umask by the kernel, as for a plain open().
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; commit it when the block ends.

    Creates ``path``'s parent folders. On leaving the block normally the temporary file is fsynced
    and renamed onto ``path``; on an exception it is deleted and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Replace ``path``'s content by ``data`` (text is written with ``encoding`` and no newline
    translation) atomically; returns ``path`` as a `Path`."""
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; returns ``path`` as a `Path`."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)
