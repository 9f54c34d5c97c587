"""How separable are the synthetic cell classes, and by what?

Prints 5-fold stratified CV balanced accuracy of
  (a) logistic regression on the 6 per-channel mean/std colour statistics, and
  (b) 20-NN (cosine) on raw pixels downscaled to 32 px,
on a freshly generated synthetic set, and on the PBC images when the folder exists. The synthetic
classes are meant to differ by shape and texture, so (a) should stay well below (b)'s ceiling
on real data and well below 100 %.

Usage: python benchmarks/synthetic_separability.py [--per-class 100] [--pbc ../shared/data/pbc_128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dinov2.data.datasets import CellImageDataset
from dinov2.data.synthetic import generate_synthetic_cells


def features(root: str | Path, max_per_class: int | None, seed: int = 0):
    ds = CellImageDataset(str(root), labeled=True)
    targets = np.asarray(ds.targets)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(targets == c)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = rng.choice(idx, max_per_class, replace=False)
        keep.extend(sorted(idx.tolist()))
    stats, pixels = [], []
    for i in keep:
        image = ds.load_image(i)
        a = np.asarray(image, dtype=np.float64) / 255.0
        stats.append(np.concatenate([a.mean((0, 1)), a.std((0, 1))]))
        pixels.append(np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32).ravel() / 255.0)
    return np.stack(stats), np.stack(pixels), targets[keep]


def report(name: str, stats: np.ndarray, pixels: np.ndarray, y: np.ndarray) -> None:
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    knn = KNeighborsClassifier(20, metric="cosine")
    a = cross_val_score(lr, stats, y, cv=cv, scoring="balanced_accuracy")
    b = cross_val_score(knn, pixels, y, cv=cv, scoring="balanced_accuracy")
    print(f"{name}: n={len(y)} classes={len(set(y))}")
    print(f"  logistic regression on colour mean/std : {100 * a.mean():5.1f} (+/- {100 * a.std():.1f}) %")
    print(f"  20-NN on raw 32 px pixels              : {100 * b.mean():5.1f} (+/- {100 * b.std():.1f}) %")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    default_pbc = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc_128"
    parser.add_argument("--pbc", type=Path, default=default_pbc)
    parser.add_argument("--pbc-per-class", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_synthetic_cells(tmp, args.per_class, size=args.size, seed=0, progress=False)
        print(f"generated {8 * args.per_class} synthetic cells in {time.perf_counter() - t0:.1f} s")
        report("synthetic", *features(tmp, None))
    if args.pbc.is_dir():
        report(f"PBC ({args.pbc_per_class}/class subset)", *features(args.pbc, args.pbc_per_class))


if __name__ == "__main__":
    main()
