import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets import CellImageDataset
from dinov2.data.synthetic import PBC_CLASSES, generate_synthetic_cells, main


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_generator_is_balanced_sized_and_labeled_like_pbc(tmp_path):
    generate_synthetic_cells(tmp_path, per_class=3, size=64, seed=0, progress=False)
    ds = CellImageDataset(str(tmp_path), labeled=True)
    assert ds.classes == sorted(PBC_CLASSES)
    assert np.bincount(ds.targets).tolist() == [3] * 8
    for path in ds.paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _digests(generate_synthetic_cells(tmp_path / "a", 2, size=48, seed=7, progress=False))
    b = _digests(generate_synthetic_cells(tmp_path / "b", 2, size=48, seed=7, progress=False))
    c = _digests(generate_synthetic_cells(tmp_path / "c", 2, size=48, seed=8, progress=False))
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_a_file_does_not_depend_on_how_many_are_generated(tmp_path):
    small = _digests(generate_synthetic_cells(tmp_path / "s", 1, size=48, seed=3, progress=False))
    large = _digests(generate_synthetic_cells(tmp_path / "l", 3, size=48, seed=3, progress=False))
    assert all(large[k] == v for k, v in small.items())


def test_cell_is_centred_and_darker_than_background(tmp_path):
    # The stained cell absorbs light: the centre of the image must be darker than its border.
    generate_synthetic_cells(tmp_path, 4, size=96, seed=1, classes=["lymphocyte", "monocyte"], progress=False)
    for path in tmp_path.rglob("*.jpg"):
        gray = np.asarray(Image.open(path).convert("L"), dtype=float)
        centre = gray[40:56, 40:56].mean()
        assert centre < np.median(gray) - 20


def test_invalid_arguments_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="per_class"):
        generate_synthetic_cells(tmp_path, 0)
    with pytest.raises(ValueError, match="unknown classes"):
        generate_synthetic_cells(tmp_path, 1, classes=["macrophage"])
    assert main(["--out", str(tmp_path / "x"), "--per-class", "1", "--size", "8"]) == 2
    assert "size must be at least" in capsys.readouterr().err


def test_cli_writes_the_tree(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--per-class", "2", "--size", "40", "--seed", "1"]) == 0
    assert len(list(tmp_path.rglob("*.jpg"))) == 16
    assert "wrote 16 images" in capsys.readouterr().out


def test_leftover_images_are_kept_and_reported(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dinov2"), "propagate", True)  # other tests may turn it off
    generate_synthetic_cells(tmp_path, 3, size=40, seed=0, classes=["platelet"], progress=False)
    caplog.set_level("WARNING", logger="dinov2")
    generate_synthetic_cells(tmp_path, 1, size=40, seed=0, classes=["platelet"], progress=False)
    assert len(list((tmp_path / "platelet").glob("*.jpg"))) == 3  # nothing deleted
    assert any("2 image(s) besides the 1 just generated" in r.getMessage() for r in caplog.records)
