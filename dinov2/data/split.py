"""Stratified train/validation/test split of a class-folder dataset (`dinov2-split`).

Input: a labeled root ``SRC/<class>/.../<image>`` (the layout `CellImageDataset` reads). Output:
``OUT/TRN/<class>/...``, ``OUT/VAL/<class>/...`` and ``OUT/TST/<class>/...`` holding every image of
SRC exactly once, plus ``OUT/split_manifest.json`` (source, ratios, seed, mode and the file lists).

How the counts are chosen (per class, independently): with ``n`` images and ratios ``r`` the quotas
are ``n * r_i``; every split first gets ``floor(n * r_i)`` images, then the images left over go one
each to the splits with the largest fractional remainders (ties: TRN before VAL before TST). This
"largest-remainder" rounding keeps every count within one image of its quota and sums to ``n``.
Which images go where is a seeded shuffle of the class's sorted file list, seeded by ``(seed,
class name)``: the same seed gives the same split on any machine, and adding a class does not
reshuffle the others.

Files are linked by default (absolute symbolic links: instant, no extra disk, but OUT breaks if
SRC moves) or copied with ``mode="copy"`` (``--copy``). SRC is only ever read. The split is built
in a hidden temporary folder inside OUT and moved into place at the end, so an interrupted run
leaves no half-written TRN/VAL/TST behind.

Example::

    dinov2-split /data/pbc OUT --ratios 0.7 0.2 0.1 --seed 0          # symlinks
    dinov2-split /data/pbc OUT --ratios 0.8 0.2 0 --seed 1 --copy     # no test split
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

SPLIT_NAMES = ("TRN", "VAL", "TST")
MANIFEST_NAME = "split_manifest.json"
LINK_MODES = ("symlink", "copy")


def largest_remainder_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n`` that follow ``ratios`` as closely as possible.

    Each count is ``floor(n * r_i)`` plus one for the ``n - sum(floors)`` entries with the largest
    fractional parts ``n * r_i - floor(n * r_i)``; equal fractions go to the earlier entry. The
    arithmetic is exact on the ratios as written (``0.7`` is 7/10, not its binary approximation,
    normalised to sum to 1), so ties such as 1218 * (0.7, 0.2) -> 852.6 / 243.6 really tie.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    exact = [Fraction(repr(float(r))) for r in ratios]
    total = sum(exact)
    quotas = [n * r / total for r in exact]
    counts = [math.floor(q) for q in quotas]
    leftover = n - sum(counts)
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return counts


def validate_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Check three non-negative ratios summing to 1 (within 1e-6) with a positive TRN share."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3:
        raise ValueError(f"expected 3 ratios (TRN VAL TST), got {len(ratios)}: {list(ratios)}")
    if any(not math.isfinite(r) or r < 0 for r in ratios):
        raise ValueError(f"ratios must be finite and >= 0, got {list(ratios)}")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"ratios must sum to 1, got {list(ratios)} (sum {sum(ratios):.6g})")
    if ratios[0] == 0:
        raise ValueError(f"the TRN ratio must be > 0, got {list(ratios)}")
    return ratios  # type: ignore[return-value]


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _split_entries_present(out: Path) -> list[str]:
    """Names in OUT that a previous split wrote (the only entries --overwrite may remove)."""
    return [n for n in (*SPLIT_NAMES, MANIFEST_NAME) if os.path.lexists(out / n)]


def _relative(path: str, parent: Path) -> str:
    """``path`` relative to ``parent`` without resolving symlinks (the dataset's paths start at SRC)."""
    rel = os.path.relpath(os.path.abspath(path), parent)
    if rel.startswith(os.pardir):
        raise ValueError(f"dataset file {path} does not lie under {parent}")
    return rel


def _place(src_file: str, dst_file: Path, mode: str) -> None:
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(os.path.abspath(src_file), dst_file)
    else:
        shutil.copy2(src_file, dst_file)


def plan_split(
    samples_by_class: dict[str, list[str]], ratios: Sequence[float], seed: int
) -> dict[str, dict[str, list[str]]]:
    """Assign files to splits: ``{split: {class: [files]}}`` (files sorted within each list).

    Args:
        samples_by_class: class name -> file paths of that class.
        ratios: (TRN, VAL, TST) shares, validated by `validate_ratios`.
        seed: shuffle seed; each class is shuffled with ``random.Random(f"{seed}:{class}")``.
    """
    ratios = validate_ratios(ratios)
    plan: dict[str, dict[str, list[str]]] = {s: {} for s in SPLIT_NAMES}
    for cls in sorted(samples_by_class):
        files = sorted(samples_by_class[cls])
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and machines.
        random.Random(f"{seed}:{cls}").shuffle(files)
        start = 0
        for split, count in zip(SPLIT_NAMES, largest_remainder_counts(len(files), ratios)):
            plan[split][cls] = sorted(files[start : start + count])
            start += count
    return plan


def format_counts_table(counts: dict[str, dict[str, int]]) -> str:
    """Per-class counts as an aligned text table with a total row (``counts[split][class]``)."""
    classes = sorted(set().union(*(counts[s].keys() for s in SPLIT_NAMES)))
    rows = [["class", "total", *SPLIT_NAMES]]
    totals = [0, 0, 0, 0]
    for cls in classes:
        per = [counts[s].get(cls, 0) for s in SPLIT_NAMES]
        rows.append([cls, str(sum(per)), *map(str, per)])
        totals = [t + v for t, v in zip(totals, [sum(per), *per])]
    rows.append(["total", *map(str, totals)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def split_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    ratios: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
    mode: str = "symlink",
    overwrite: bool = False,
    check_corrupted: bool = False,
) -> dict[str, dict[str, int]]:
    """Write a stratified TRN/VAL/TST split of the class-folder dataset ``src`` into ``out``.

    Images are discovered with `CellImageDataset(src, labeled=True)`, so hidden files and
    non-image files are skipped exactly as training skips them. Every class folder of SRC is
    created in every split (possibly empty when a class has too few images for a ratio).

    Args:
        src: labeled dataset root (``src/<class>/.../<image>``); never modified.
        out: output folder; must be empty or absent unless ``overwrite``.
        ratios: (TRN, VAL, TST) shares, >= 0, summing to 1, TRN > 0.
        seed: shuffle seed (same seed -> same split).
        mode: "symlink" (absolute links to the SRC files) or "copy".
        overwrite: replace the TRN/VAL/TST folders and manifest of a previous split in ``out``
            (other entries of ``out`` are left alone; anything else there is refused).
        check_corrupted: decode every image first and leave out the unreadable ones.

    Returns:
        ``{split: {class: count}}`` for splits "TRN", "VAL", "TST".

    Raises:
        FileNotFoundError: ``src`` does not exist. ValueError: bad ratios/mode, ``out`` not empty
        (without ``overwrite``) or overlapping ``src``, or ``src`` not class-folder shaped.
    """
    from dinov2.data.datasets import CellImageDataset

    if mode not in LINK_MODES:
        raise ValueError(f"mode must be one of {LINK_MODES}, got {mode!r}")
    ratios = validate_ratios(ratios)
    src_path, out_path = Path(src).resolve(), Path(out).resolve()
    if not src_path.is_dir():
        raise FileNotFoundError(f"source dataset folder not found: {src}")
    if _is_within(out_path, src_path) or _is_within(src_path, out_path):
        raise ValueError(f"output folder {out} must lie outside the source folder {src} (and not contain it)")
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    if out_path.is_dir():
        existing = sorted(os.listdir(out_path))
        if existing and not overwrite:
            raise ValueError(
                f"output folder {out} is not empty ({len(existing)} entries, e.g. {existing[:3]}); "
                "choose another folder or pass --overwrite to replace a previous split"
            )
        foreign = [n for n in existing if n not in (*SPLIT_NAMES, MANIFEST_NAME)]
        if existing and foreign:
            raise ValueError(
                f"output folder {out} holds entries this tool did not write ({foreign[:3]}); "
                "--overwrite only replaces TRN/VAL/TST and the manifest, so refusing"
            )

    dataset = CellImageDataset(str(src_path), labeled=True, check_corrupted=check_corrupted)
    by_class: dict[str, list[str]] = {c: [] for c in dataset.classes}
    for path, target in dataset.samples:
        by_class[dataset.classes[target]].append(path)
    plan = plan_split(by_class, ratios, seed)

    out_path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".split-tmp-", dir=out_path))
    try:
        for split in SPLIT_NAMES:
            for cls, files in plan[split].items():
                (tmp / split / cls).mkdir(parents=True, exist_ok=True)
                for f in files:
                    # Keep the path below the class folder so nested files with equal names stay apart.
                    _place(f, tmp / split / cls / _relative(f, src_path / cls), mode)
        manifest = {
            "source": str(src_path),
            "ratios": list(ratios),
            "seed": seed,
            "mode": mode,
            "classes": list(dataset.classes),
            "splits": {
                s: {c: [_relative(f, src_path) for f in fs] for c, fs in plan[s].items()} for s in SPLIT_NAMES
            },
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        for name in _split_entries_present(out_path):
            target = out_path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        for name in (*SPLIT_NAMES, MANIFEST_NAME):
            os.replace(tmp / name, out_path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {s: {c: len(fs) for c, fs in plan[s].items()} for s in SPLIT_NAMES}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "dinov2-split",
        description="Stratified TRN/VAL/TST split of a class-folder image dataset (SRC is never modified).",
        add_help=add_help,
    )
    parser.add_argument("src", help="labeled dataset root: SRC/<class>/<images>")
    parser.add_argument("out", help="output folder (gets TRN/, VAL/, TST/ and split_manifest.json)")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs=3,
        default=[0.7, 0.2, 0.1],
        metavar=("TRN", "VAL", "TST"),
        help="shares of each class per split, summing to 1 (default: 0.7 0.2 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--link",
        dest="mode",
        action="store_const",
        const="symlink",
        help="symlink files to SRC (default; instant, but OUT breaks if SRC moves)",
    )
    group.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy the files")
    parser.set_defaults(mode="symlink")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace TRN/VAL/TST of a previous split in OUT"
    )
    parser.add_argument(
        "--check-corrupted",
        action="store_true",
        help="decode every image first and leave out unreadable ones",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 0 on success, 2 on bad arguments or a refused OUT folder."""
    args = get_args_parser().parse_args(argv)
    try:
        counts = split_dataset(
            args.src, args.out, args.ratios, args.seed, args.mode, args.overwrite, args.check_corrupted
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"dinov2-split: error: {e}", file=sys.stderr)
        return 2
    print(format_counts_table(counts))
    print(f"wrote {args.out} ({'symlinks' if args.mode == 'symlink' else 'copies'}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
