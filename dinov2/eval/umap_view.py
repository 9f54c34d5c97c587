"""2-D UMAP views of an embedding: points coloured by class, and cell thumbnails at their positions.

UMAP (umap-learn) runs on the L2-normalised features with the cosine metric, seeded, so the same
features give the same picture. umap-learn compiles its numba kernels on first use, which takes
tens of seconds once per process.

Example::

    coords = umap_embedding(fs.features, seed=0)
    plot_umap(coords, fs.labels, fs.class_names, "umap.png")
    plot_umap_thumbnails(coords, fs.paths, "umap_cells.png", n_max=400)
    save_coords_csv(coords, fs, "umap.csv")
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dinov2.utils.files import atomic_path, atomic_write


def umap_embedding(
    features,
    seed: int = 0,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    n_components: int = 2,
) -> np.ndarray:
    """UMAP coordinates [N, n_components] (float32) of features [N, D].

    Args:
        features: [N, D] array, N >= 3.
        seed: UMAP random state (fixes the layout; makes umap-learn single-threaded).
        n_neighbors: local neighbourhood size (clipped to N - 1).
        min_dist: minimum spacing of points in the layout.
        metric: distance on the features (cosine on L2-normalised features by default).
        n_components: output dimension.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"UMAP needs features [N, D] with N >= 3, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    if not 0.0 <= min_dist <= 1.0:
        raise ValueError(f"min_dist must be in [0, 1], got {min_dist}")
    import umap

    reducer = umap.UMAP(
        n_neighbors=min(n_neighbors, len(x) - 1),
        min_dist=min_dist,
        metric=metric,
        n_components=n_components,
        random_state=seed,
    )
    with warnings.catch_warnings():
        # "n_jobs overridden by random_state" and spectral-init fallbacks on tiny sets: expected.
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(x).astype(np.float32)


def _new_figure(size_inches: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_inches, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _check_coords(coords) -> np.ndarray:
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2], got shape {c.shape}")
    return c


def plot_umap(
    coords,
    labels,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    point_size: float | None = None,
    size_inches: tuple[float, float] = (8.0, 6.5),
    dpi: int = 120,
) -> Path:
    """Scatter of 2-D coordinates coloured by class with a legend (label -1: grey "unlabeled")."""
    c = _check_coords(coords)
    y = np.asarray(labels).astype(np.int64)
    if len(y) != len(c):
        raise ValueError(f"{len(c)} points but {len(y)} labels")
    fig = _new_figure(size_inches, dpi)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    s = point_size if point_size is not None else max(1.0, min(20.0, 3000.0 / max(1, len(c))))
    for k in np.unique(y):
        sel = y == k
        name = class_names[k] if 0 <= k < len(class_names) else "unlabeled"
        color = cmap(int(k) % cmap.N) if k >= 0 else (0.6, 0.6, 0.6, 1.0)
        ax.scatter(c[sel, 0], c[sel, 1], s=s, color=color, label=f"{name} ({int(sel.sum())})", linewidths=0)
    ax.legend(markerscale=max(1.0, 30.0 / s) ** 0.5, fontsize=8, loc="best", frameon=True)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or "UMAP of the embeddings")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def _thumbnail(path: str, size: int) -> np.ndarray:
    from dinov2.data.image_io import load_rgb

    img = load_rgb(path)
    img.thumbnail((size, size))
    return np.asarray(img)


def plot_umap_thumbnails(
    coords,
    image_paths: Sequence[str],
    path: str | os.PathLike,
    *,
    n_max: int = 400,
    thumb_size: int = 32,
    labels=None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    title: str | None = None,
    size_inches: tuple[float, float] = (12.0, 12.0),
    dpi: int = 120,
) -> Path:
    """Draw cell thumbnails at their 2-D positions ("RGB images of cells").

    Args:
        coords: [N, 2]; image_paths: [N] images.
        path: output .png.
        n_max: at most this many thumbnails (a seeded random subset; stratified by class when
            ``labels`` is given, so rare classes still show).
        thumb_size: thumbnail side in pixels (of the source image).
        labels, class_names: optional; frame each thumbnail in its class colour with a legend.
    """
    c = _check_coords(coords)
    if len(image_paths) != len(c):
        raise ValueError(f"{len(c)} points but {len(image_paths)} image paths")
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    rng = np.random.default_rng(seed)
    n = len(c)
    if n <= n_max:
        chosen = np.arange(n)
    elif labels is not None:
        y = np.asarray(labels)
        classes = np.unique(y)
        per = max(1, n_max // len(classes))
        chosen = np.concatenate([rng.permutation(np.flatnonzero(y == k))[:per] for k in classes])[:n_max]
    else:
        chosen = rng.choice(n, size=n_max, replace=False)
    fig = _new_figure(size_inches, dpi)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    zoom = (size_inches[0] * dpi / 30.0) / thumb_size  # ~30 thumbnails across the figure
    for i in chosen:
        thumb = _thumbnail(image_paths[i], thumb_size)
        kw = {}
        if labels is not None:
            kw = {"bboxprops": {"edgecolor": cmap(int(labels[i]) % 10), "linewidth": 1.5}}
        box = AnnotationBbox(
            OffsetImage(thumb, zoom=zoom), (c[i, 0], c[i, 1]), frameon=labels is not None, pad=0.05, **kw
        )
        ax.add_artist(box)
    pad = 0.05 * (np.ptp(c[:, 0]) + np.ptp(c[:, 1]) + 1e-9)
    ax.set_xlim(c[:, 0].min() - pad, c[:, 0].max() + pad)
    ax.set_ylim(c[:, 1].min() - pad, c[:, 1].max() + pad)
    if labels is not None and class_names is not None:
        from matplotlib.patches import Patch

        present = sorted({int(labels[i]) for i in chosen if int(labels[i]) >= 0})
        ax.legend(handles=[Patch(color=cmap(k % 10), label=class_names[k]) for k in present], fontsize=8)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or f"UMAP with cell thumbnails ({len(chosen)} of {n})")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def save_coords_csv(
    coords,
    path: str | os.PathLike,
    *,
    paths: Sequence[str] | None = None,
    labels=None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write ``x,y`` per point (with ``path``, ``label``, ``class`` columns when given)."""
    c = _check_coords(coords)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = (["path"] if paths is not None else []) + ["x", "y"]
    if labels is not None:
        header += ["label"] + (["class"] if class_names is not None else [])
    w.writerow(header)
    for i in range(len(c)):
        row = ([paths[i]] if paths is not None else []) + [f"{c[i, 0]:.6g}", f"{c[i, 1]:.6g}"]
        if labels is not None:
            k = int(labels[i])
            row.append(k)
            if class_names is not None:
                row.append(class_names[k] if 0 <= k < len(class_names) else "")
        w.writerow(row)
    return atomic_write(path, buf.getvalue())
