"""Find the image files of dataset roots that cannot be decoded (`dinov2-scan`).

Every image the dataset would read (`find_images`: recursive, hidden entries skipped) is fully
decoded with `dinov2.data.image_io.decode_rgb` in a pool of worker processes, and each problem
(zero bytes, truncated, not an image, unreadable mode, too large, unreadable) is reported with the
path of every file that has it. Hidden files below the roots (macOS `.DS_*` files named like
images, `._*` resource forks) are listed as skipped, never as broken: the dataset ignores them.

Results are cached per root in a JSON file keyed on (relative path, size, mtime_ns), so a re-scan
decodes only new or changed files; the cache of a 1M-file tree is read in seconds. The cache lives
under `$DINOV2_CACHE_DIR/scan` (default `~/.cache/dinov2-cells/scan`), one file per root named by
the SHA-1 of the root's absolute path, and is replaced atomically (`dinov2.data.scan_cache`).

Example::

    dinov2-scan /data/pbc /data/extra --report scan.csv --quarantine /data/quarantine

prints the counts per problem with the paths, writes one CSV row per file, moves the broken files
into /data/quarantine (keeping their path relative to their root; nothing is deleted or
overwritten) and exits with 1 when anything is broken, 0 when everything decodes, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import errno
import functools
import io
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dinov2.data.files import IMAGE_EXTENSIONS, is_hidden
from dinov2.data.image_io import DEFAULT_MAX_PIXELS, PROBLEMS, ImageDecodeError, decode_rgb
from dinov2.data.scan_cache import OK, CacheEntries, cache_file, forget_in_cache, load_cache, save_cache
from dinov2.utils.files import atomic_write

logger = logging.getLogger("dinov2")

CSV_COLUMNS = ("path", "status", "detail")


@dataclass
class ScanReport:
    """What a scan found. Paths are strings exactly as `find_images` produces them."""

    ok: list[str]
    """Files that decode to RGB, sorted."""
    problems: dict[str, list[tuple[str, str]]]
    """Problem (one of `image_io.PROBLEMS`) -> sorted (path, detail) pairs; only problems that occur."""
    n_files: int
    """Image files found below the roots (each counted once even when roots overlap)."""
    n_cached: int
    """Files whose result came from the cache instead of a decode."""
    hidden: list[str] = field(default_factory=list)
    """Hidden files and folders (ending in os.sep) below the roots, which dataset discovery skips."""
    roots: list[str] = field(default_factory=list)
    """The scanned roots, as given."""

    @property
    def n_broken(self) -> int:
        return sum(len(items) for items in self.problems.values())

    def broken_paths(self) -> list[str]:
        """Every path with a problem, sorted."""
        return sorted(path for items in self.problems.values() for path, _ in items)

    def root_of(self, path: str) -> str:
        """The first root (in the given order) that `path` lies below."""
        for root in self.roots:
            relative = _relative_below(os.path.abspath(path), os.path.abspath(root))
            if relative is not None and relative != os.curdir:
                return root
        raise ValueError(f"{path} is not below any scanned root ({', '.join(self.roots)})")

    def summary(self, max_paths: int | None = None) -> str:
        """Counts per problem with the paths (at most `max_paths` per group), then skipped hidden files."""
        lines = [
            f"scanned {self.n_files} image files in {len(self.roots)} root(s): {len(self.ok)} ok, "
            f"{self.n_broken} broken ({self.n_cached} results from the cache)"
        ]
        for problem, items in self.problems.items():
            lines.append(f"{problem}: {len(items)}")
            lines.extend(_indented([p + (f"  ({d})" if d else "") for p, d in items], max_paths))
        if self.hidden:
            lines.append(f"skipped {len(self.hidden)} hidden file(s)/folder(s) (not part of the dataset):")
            lines.extend(_indented(self.hidden, max_paths))
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per scanned file: path, status ("ok" or the problem), detail; sorted by path."""
        rows = [(p, OK, "") for p in self.ok]
        rows += [(p, problem, detail) for problem, items in self.problems.items() for p, detail in items]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(sorted(rows))
        atomic_write(path, buf.getvalue())


def _relative_below(path: str, folder: str) -> str | None:
    """`path` relative to `folder` when it lies in it (or is it), else None."""
    relative = os.path.relpath(path, folder)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None
    return relative


def _indented(lines: list[str], max_lines: int | None) -> list[str]:
    shown = lines if max_lines is None else lines[:max_lines]
    out = [f"  {line}" for line in shown]
    if len(shown) < len(lines):
        out.append(f"  ... and {len(lines) - len(shown)} more")
    return out


# ----------------------------------------------------------------------------------------- listing


@dataclass
class RootListing:
    """The files of one root as dataset discovery sees them."""

    images: list[str]
    """Same list as `find_images(root)`."""
    hidden: list[str]
    unlisted: list[tuple[str, str]]
    """(folder, reason) for folders that could not be read; their images are unknown."""


def _folder_prefix(folder: str) -> str:
    """`folder` with exactly the separator os.path.join would put before a child's name."""
    return folder if folder.endswith(os.sep) else folder + os.sep


def list_root(root: str) -> RootListing:
    """Walk `root` once the way `find_images` does, also collecting hidden entries and listing errors."""
    images: list[str] = []
    hidden: list[str] = []
    unlisted: list[tuple[str, str]] = []

    def on_error(exc: OSError) -> None:
        unlisted.append((exc.filename or root, f"folder cannot be listed: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        base = _folder_prefix(dirpath)  # base + name == os.path.join(dirpath, name), without its cost
        hidden.extend(base + d + os.sep for d in dirnames if is_hidden(d))  # trailing "/": a folder
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in filenames:
            if is_hidden(name):
                hidden.append(base + name)
            elif name.lower().endswith(IMAGE_EXTENSIONS):  # is_image_file for a name known not hidden
                images.append(base + name)
    return RootListing(sorted(images), sorted(hidden), sorted(unlisted))


# ------------------------------------------------------------------------------------------ decode


def check_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str, str]:
    """Fully decode one file: (path, "ok" or the problem, detail). Never raises."""
    try:
        decode_rgb(path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return path, exc.problem, exc.detail
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a million-file scan
        return path, "unreadable", f"{type(exc).__name__}: {exc}"
    return path, OK, ""


def _decode_all(
    paths: list[str], workers: int, max_pixels: int, bar: tqdm, results: dict[str, tuple[str, str]]
) -> None:
    """Decode `paths` (in-process when workers <= 1), filling `results[path] = (status, detail)`."""
    check = functools.partial(check_file, max_pixels=max_pixels)
    if workers <= 1 or len(paths) < 2:
        for path in paths:
            _, status, detail = check(path)
            results[path] = (status, detail)
            bar.update(1)
        return
    workers = min(workers, len(paths))
    # Chunks amortise the inter-process round trip; 16 chunks per worker keep the tail short.
    chunksize = max(1, min(256, len(paths) // (workers * 16)))
    with multiprocessing.get_context().Pool(workers) as pool:
        for path, status, detail in pool.imap_unordered(check, paths, chunksize=chunksize):
            results[path] = (status, detail)
            bar.update(1)


def scan_images(
    roots: str | os.PathLike | Sequence[str | os.PathLike],
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    use_cache: bool = True,
) -> ScanReport:
    """Fully decode every image below `roots` and report the broken ones, grouped by problem.

    Args:
        roots: a folder or a list of folders (found recursively like `CellImageDataset` does).
        workers: decoding processes; None uses every core, 0 or 1 decodes in this process.
        cache_dir: where per-root caches live (default `default_cache_dir()`).
        progress: show a tqdm bar over the files.
        max_pixels: images with more pixels are reported as "too_large".
        use_cache: False neither reads nor writes the cache (everything is decoded).

    Raises:
        FileNotFoundError / NotADirectoryError: a root is missing or is not a folder.
    """
    roots = [os.fspath(roots)] if isinstance(roots, str | os.PathLike) else [os.fspath(r) for r in roots]
    if not roots:
        raise ValueError("no root to scan")
    for root in roots:
        if not os.path.exists(root):
            raise FileNotFoundError(f"scan root does not exist: {root}")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"scan root is not a folder: {root}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")

    results: dict[str, tuple[str, str]] = {}  # path -> (status, detail), each path once
    seen: set[str] = set()  # image files (a file below two nested roots counts once)
    stats: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) for files that could be stat'ed
    hidden: set[str] = set()
    per_root: list[tuple[str, list[tuple[str, str]], CacheEntries]] = []  # root, (path, relative), cache
    to_decode: list[str] = []
    n_cached = 0
    for root in roots:
        listing = list_root(root)
        hidden.update(listing.hidden)
        for folder, reason in listing.unlisted:
            results.setdefault(folder, ("unreadable", reason))
        cached = load_cache(root, cache_dir, max_pixels) if use_cache else {}
        # Paths are root + separator + relative path (see list_root); slicing is 10x cheaper than relpath.
        skip = len(_folder_prefix(root))
        files = [(path, path[skip:]) for path in listing.images]
        per_root.append((root, files, cached))
        for path, relative in files:
            if path in seen:
                continue  # already found under an earlier, enclosing root
            seen.add(path)
            try:
                st = os.stat(path)
            except OSError as exc:
                results[path] = ("unreadable", f"cannot stat: {exc.strerror or exc}")
                continue
            stats[path] = (st.st_size, st.st_mtime_ns)
            entry = cached.get(relative)
            if entry is not None and entry[:2] == stats[path]:
                results[path] = (entry[2], entry[3])
                n_cached += 1
            else:
                to_decode.append(path)

    n_files = len(seen)
    bar = tqdm(total=n_files, initial=n_cached, desc="scan", unit="file", disable=not progress)
    try:
        _decode_all(to_decode, workers, max_pixels, bar, results)
    finally:
        bar.close()
        # Saved even when interrupted, so a re-run resumes with what was already decoded.
        if use_cache:
            for root, files, cached in per_root:
                entries: CacheEntries = {}
                for path, relative in files:
                    verdict = results.get(path)
                    # "unreadable" (permissions, I/O errors) can change without touching mtime.
                    if verdict is not None and path in stats and verdict[0] != "unreadable":
                        entries[relative] = (*stats[path], *verdict)
                if entries != cached or not cache_file(root, cache_dir).exists():
                    save_cache(root, cache_dir, max_pixels, entries)

    grouped: dict[str, list[tuple[str, str]]] = {status: [] for status in (OK, *PROBLEMS)}
    for path, (status, detail) in results.items():
        grouped[status].append((path, detail))
    ok = sorted(path for path, _ in grouped.pop(OK))
    problems = {problem: sorted(items) for problem, items in grouped.items() if items}
    return ScanReport(ok, problems, n_files, n_cached, sorted(hidden), roots)


# -------------------------------------------------------------------------------------- quarantine


def _numbered(path: Path, k: int) -> Path:
    return path if k == 0 else path.with_name(f"{path.stem}_{k}{path.suffix}")


def move_no_overwrite(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move `src` to `dst`, or to `dst` with `_1`, `_2`, ... before the suffix when taken; return it.

    Never overwrites: the target is created exclusively (hard link, or an `xb` copy across file
    systems) before `src` is unlinked, so a crash leaves the file in one place or both, never none.
    """
    src, dst = os.fspath(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    k = 0
    while True:
        target = _numbered(dst, k)
        try:
            try:
                os.link(src, target, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                    raise
                _copy_exclusive(src, target)
        except FileExistsError:
            k += 1
            continue
        os.unlink(src)
        return target


def _copy_exclusive(src: str, target: Path) -> None:
    """Copy `src` to a not-yet-existing `target` (FileExistsError if it exists)."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), target)
        return
    try:
        with open(src, "rb") as fin, open(target, "xb") as fout:
            shutil.copyfileobj(fin, fout)
        shutil.copystat(src, target)
    except FileExistsError:
        raise
    except BaseException:
        if target.exists():
            target.unlink()  # a partial copy; the source is still intact
        raise


def quarantine(
    report: ScanReport, destination: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """Move every broken file of `report` below `destination`, keeping its path relative to its root.

    Returns (source, target) pairs. Folders that could not be listed are left where they are; a
    file that cannot be moved (permissions) stays too, with a warning. The moved files are dropped
    from the scan cache of every root they were found under (roots may be nested).
    """
    moved: list[tuple[str, str]] = []
    forgotten: dict[str, list[str]] = {}
    try:
        for path in report.broken_paths():
            if not os.path.lexists(path) or os.path.isdir(path):
                continue
            relative = os.path.relpath(path, report.root_of(path))
            try:
                target = move_no_overwrite(path, Path(destination) / relative)
            except OSError as exc:
                logger.warning("could not quarantine %s (%s); it stays where it is", path, exc)
                continue
            moved.append((path, str(target)))
            for root in report.roots:
                below = _relative_below(os.path.abspath(path), os.path.abspath(root))
                if below is not None:
                    forgotten.setdefault(root, []).append(below)
    finally:
        for root, relatives in forgotten.items():
            forget_in_cache(root, relatives, cache_dir)
    return moved


# --------------------------------------------------------------------------------------------- CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "dinov2-scan",
        description="Fully decode every image below ROOT(s) and report the broken files by problem.",
        add_help=add_help,
    )
    parser.add_argument("roots", nargs="+", metavar="ROOT", help="dataset folder(s), searched recursively")
    parser.add_argument("--report", metavar="CSV", help="write one row per file: path,status,detail")
    parser.add_argument(
        "--quarantine", metavar="DIR", help="move broken files into DIR (relative paths kept; never deletes)"
    )
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument(
        "--no-cache", action="store_true", help="decode everything; neither read nor write the cache"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _usage_problem(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot work, or None."""
    for root in args.roots:
        if not os.path.exists(root):
            return f"root does not exist: {root}"
        if not os.path.isdir(root):
            return f"root is not a folder: {root}"
    if args.workers is not None and args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    if args.report is not None:
        parent = os.path.dirname(os.path.abspath(args.report))
        if os.path.isdir(args.report):
            return f"--report is a folder, expected a CSV file path: {args.report}"
        if not os.path.isdir(parent):
            return f"--report folder does not exist: {parent}"
    if args.quarantine is not None:
        if os.path.exists(args.quarantine) and not os.path.isdir(args.quarantine):
            return f"--quarantine is a file, expected a folder: {args.quarantine}"
        dest = os.path.realpath(args.quarantine)
        for root in args.roots:
            relative = _relative_below(dest, os.path.realpath(root))
            # A hidden quarantine folder inside a root is fine: discovery never looks there.
            if relative is not None and not any(is_hidden(part) for part in Path(relative).parts):
                return (
                    f"--quarantine {args.quarantine} lies inside the scanned root {root}, where the moved "
                    "files would be found again; use a folder outside it or a hidden one (ROOT/.quarantine)"
                )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 0 when every file decodes, 1 when any is broken, 2 on bad usage."""
    args = get_args_parser().parse_args(argv)
    problem = _usage_problem(args)
    if problem is not None:
        print(f"dinov2-scan: error: {problem}", file=sys.stderr)
        return 2
    report = scan_images(
        args.roots, workers=args.workers, progress=not args.no_progress, use_cache=not args.no_cache
    )
    print(report.summary())
    if args.report is not None:
        report.to_csv(args.report)
        print(f"wrote {args.report} ({report.n_files} files)")
    if args.quarantine is not None:
        moved = quarantine(report, args.quarantine)
        print(f"moved {len(moved)} broken file(s) into {args.quarantine}:")
        for source, target in moved:
            print(f"  {source} -> {target}")
    return 1 if report.n_broken else 0


if __name__ == "__main__":
    sys.exit(main())
