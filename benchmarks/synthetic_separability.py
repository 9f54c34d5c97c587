"""How separable are the synthetic cell classes, and by what?

Prints 5-fold stratified CV balanced accuracy of
  (a) logistic regression on the 6 per-channel mean/std colour statistics,
  (b) 20-NN (cosine) on raw pixels downscaled to 32 px, and
  (c) logistic regression on colour-free shape/texture descriptors (per-image standardised
      grayscale: radial intensity and gradient profiles around the centre, gradient and
      intensity histograms of the central disc),
on a freshly generated synthetic set, and on the PBC images when the folder exists. The synthetic
classes are meant to differ by shape and texture, not by colour: (a) should stay well below
100 % (near its value on real data), while (c), which sees no colour at all, separates them.

Usage: python benchmarks/synthetic_separability.py [--per-class 100] [--pbc ../shared/data/pbc_128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 (imported for its effect: this checkout's dinov2 first on sys.path)
import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dinov2.data.datasets import CellImageDataset
from dinov2.data.synthetic import generate_synthetic_cells


def shape_texture(image: Image.Image, n_rings: int = 12) -> np.ndarray:
    """Colour-free descriptors of a centred cell: 2 * n_rings radial profiles + 16 histogram bins.

    The grayscale image (64 px) is standardised per image, so stain strength and hue do not count.
    """
    g = np.asarray(image.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float64)
    g = (g - g.mean()) / (g.std() + 1e-6)
    yy, xx = np.indices(g.shape)
    r = np.hypot(yy - (g.shape[0] - 1) / 2, xx - (g.shape[1] - 1) / 2) / (g.shape[0] / 2)
    ring = np.minimum((r * n_rings).astype(int), n_rings).ravel()
    counts = np.maximum(np.bincount(ring, minlength=n_rings + 1), 1)
    magnitude = np.hypot(*np.gradient(g))
    intensity_profile = np.bincount(ring, g.ravel(), n_rings + 1) / counts
    gradient_profile = np.bincount(ring, magnitude.ravel(), n_rings + 1) / counts
    centre = r < 0.6
    gradient_hist = np.histogram(magnitude[centre], bins=8, range=(0, 3))[0] / centre.sum()
    intensity_hist = np.histogram(g[centre], bins=8, range=(-3, 2))[0] / centre.sum()
    return np.concatenate(
        [intensity_profile[:n_rings], gradient_profile[:n_rings], gradient_hist, intensity_hist]
    )


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
    stats, pixels, shapes = [], [], []
    for i in keep:
        image = ds.load_image(i)
        a = np.asarray(image, dtype=np.float64) / 255.0
        stats.append(np.concatenate([a.mean((0, 1)), a.std((0, 1))]))
        pixels.append(np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32).ravel() / 255.0)
        shapes.append(shape_texture(image))
    return np.stack(stats), np.stack(pixels), np.stack(shapes), targets[keep]


def report(name: str, stats: np.ndarray, pixels: np.ndarray, shapes: np.ndarray, y: np.ndarray) -> None:
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    knn = KNeighborsClassifier(20, metric="cosine")
    a = cross_val_score(lr, stats, y, cv=cv, scoring="balanced_accuracy")
    b = cross_val_score(knn, pixels, y, cv=cv, scoring="balanced_accuracy")
    lr_shape = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    c = cross_val_score(lr_shape, shapes, y, cv=cv, scoring="balanced_accuracy")
    print(f"{name}: n={len(y)} classes={len(set(y))}")
    print(f"  logistic regression on colour mean/std : {100 * a.mean():5.1f} (+/- {100 * a.std():.1f}) %")
    print(f"  20-NN on raw 32 px pixels              : {100 * b.mean():5.1f} (+/- {100 * b.std():.1f}) %")
    print(f"  logistic regression on shape/texture   : {100 * c.mean():5.1f} (+/- {100 * c.std():.1f}) %")


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
        c0 = time.process_time()
        generate_synthetic_cells(tmp, args.per_class, size=args.size, seed=0, progress=False)
        n = 8 * args.per_class
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"generated {n} synthetic cells of {args.size} px in {wall:.1f} s wall ({n / wall:.0f} img/s), "
              f"{cpu:.1f} s CPU ({n / cpu:.0f} img/s per core)")  # fmt: skip
        report("synthetic", *features(tmp, None))
    if args.pbc.is_dir():
        report(f"PBC ({args.pbc_per_class}/class subset)", *features(args.pbc, args.pbc_per_class))


if __name__ == "__main__":
    main()
