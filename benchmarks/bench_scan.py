"""Benchmark: the corruption scan (dinov2.data.scan) on a cold cache versus a cached re-scan.

The baseline is the first scan, which fully decodes every file in `--workers` processes; the
re-scan of the unchanged tree only lists and stat()s the files and reads the JSON cache. Prints
files/s of both and the speed-up. The cache goes to a temporary folder (yours is not touched), so
the first scan is always cold for the scanner; the OS file cache may already hold the images.
With `--serial` the first scan is also timed in one process, to show what the pool buys.

    .venv/bin/python benchmarks/bench_scan.py /work/shared/data/pbc_128 --workers 2
    .venv/bin/python benchmarks/bench_scan.py --generate 5000        # a generated tree of JPEGs
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import host_summary


def generate_tree(out: Path, n: int, size: int = 128, classes: int = 8) -> Path:
    """`n` random-noise JPEGs of `size` px in `classes` folders (noise decodes like real smears)."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    for i in tqdm(range(n), desc="generate", unit="img"):
        folder = out / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i:07d}.jpg", quality=85)
    return out


def timed_scan(root: str, workers: int, cache_dir: str, use_cache: bool = True):
    from dinov2.data.scan import scan_images

    start = time.perf_counter()
    report = scan_images(root, workers=workers, cache_dir=cache_dir, progress=False, use_cache=use_cache)
    return report, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", help="folder to scan (default: a generated tree, see --generate)")
    p.add_argument("--generate", type=int, default=5000, help="images in the generated tree when no root")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    p.add_argument("--rescans", type=int, default=3, help="cached re-scans to time (best is reported)")
    p.add_argument("--serial", action="store_true", help="also time a cold scan in one process")
    args = p.parse_args(argv)

    print(f"host: {host_summary()}, load average {os.getloadavg()[0]:.1f}, workers={args.workers}")
    with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
        root = args.root or str(generate_tree(Path(tmp) / "tree", args.generate))
        cache_dir = str(Path(tmp) / "cache")

        if args.serial:
            report, seconds = timed_scan(root, 1, cache_dir, use_cache=False)
            print(f"first scan, 1 process      : {report.n_files} files in {seconds:7.2f} s = "
                  f"{report.n_files / seconds:8.0f} files/s")  # fmt: skip
        report, first = timed_scan(root, args.workers, cache_dir)
        n = report.n_files
        counts = f"{len(report.ok)} ok, {report.n_broken} broken, {len(report.hidden)} hidden skipped"
        print(f"first scan, {args.workers} process(es) : {n} files in {first:7.2f} s = "
              f"{n / first:8.0f} files/s ({counts})")  # fmt: skip
        rescans = []
        for _ in range(args.rescans):
            again, seconds = timed_scan(root, args.workers, cache_dir)
            assert again.n_cached == again.n_files == n, "the re-scan should come entirely from the cache"
            rescans.append(seconds)
        best = min(rescans)
        print(
            f"cached re-scan (best of {args.rescans}): {n} files in {best:7.2f} s = {n / best:8.0f} files/s"
        )
        print(f"speed-up of the re-scan over the first scan: {first / best:.1f}x")


if __name__ == "__main__":
    main()
