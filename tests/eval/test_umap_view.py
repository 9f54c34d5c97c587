"""UMAP: seeded layout that reflects the input's clusters, PNGs of the expected size whose content
depends on the input, thumbnails view and the coordinates CSV."""

import csv

import numpy as np
import pytest
from PIL import Image

from dinov2.eval.umap_view import plot_umap, plot_umap_thumbnails, save_coords_csv, umap_embedding


@pytest.fixture(scope="session")
def clustered():
    """Three well-separated clusters and their UMAP (numba JIT warm-up paid once per session)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    centers = np.eye(3, 10) * 10
    x = (centers[y] + 0.3 * rng.normal(size=(60, 10))).astype(np.float32)
    return x, y, umap_embedding(x, seed=0, n_neighbors=8)


def test_umap_is_seeded_and_keeps_clusters(clustered):
    x, y, coords = clustered
    assert coords.shape == (60, 2) and coords.dtype == np.float32
    np.testing.assert_array_equal(coords, umap_embedding(x, seed=0, n_neighbors=8))
    # Every point's nearest neighbour in the layout is from its own cluster.
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).all()


def test_umap_errors():
    with pytest.raises(ValueError, match="N >= 3"):
        umap_embedding(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        umap_embedding(np.full((5, 2), np.nan))


def test_plot_umap_size_and_content(tmp_path, clustered):
    _, y, coords = clustered
    a = plot_umap(coords, y, ["a", "b", "c"], tmp_path / "a.png", size_inches=(4, 3), dpi=50)
    b = plot_umap(coords[::-1] * [1, -1], y, ["a", "b", "c"], tmp_path / "b.png", size_inches=(4, 3), dpi=50)
    ia, ib = np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB"))
    assert ia.shape == (150, 200, 3) == ib.shape
    assert (ia != ib).any()
    # tab10's first three colours are drawn (one per class), e.g. blue (31, 119, 180).
    assert (np.abs(ia.astype(int) - [31, 119, 180]).sum(-1) < 30).any()
    with pytest.raises(ValueError, match="labels"):
        plot_umap(coords, y[:5], ["a"], tmp_path / "c.png")


def test_thumbnails_and_coords_csv(tmp_path, clustered):
    _, y, coords = clustered
    paths = []
    colours = [(255, 0, 0), (0, 200, 0), (0, 0, 255)]
    for i, k in enumerate(y):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (16, 16), colours[k]).save(p)
        paths.append(str(p))
    out = plot_umap_thumbnails(coords, paths, tmp_path / "thumbs.png", n_max=30, size_inches=(4, 4), dpi=50)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (200, 200, 3)
    for c in colours:  # thumbnails of every class are drawn with their pixels
        assert (np.abs(img - c).sum(-1) < 10).sum() > 20, c
    csv_path = save_coords_csv(coords, tmp_path / "u.csv", paths=paths, labels=y, class_names=["a", "b", "c"])
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 60 and rows[0]["path"] == paths[0] and rows[25]["class"] == "b"
    assert float(rows[7]["x"]) == pytest.approx(float(coords[7, 0]), rel=1e-5)
