import numpy as np
import pytest
from PIL import Image

from dinov2.eval.selection import sample_images_per_class


def _tree(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / name / f"{i}.png")


def test_picks_per_class_seeded_and_clipped(tmp_path):
    _tree(tmp_path, {"a": 5, "b": 1, "c": 3})
    picked = sample_images_per_class(tmp_path, per_class=2, seed=3)
    classes = [p.split("/")[-2] for p in picked]
    assert classes == ["a", "a", "b", "c", "c"]  # sorted classes, b has only one image
    assert len(set(picked)) == len(picked)
    assert picked == sample_images_per_class(tmp_path, per_class=2, seed=3)
    draws = {tuple(sample_images_per_class(tmp_path, per_class=2, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    assert np.all([p.startswith(str(tmp_path)) for p in picked])


def test_rejects_bad_count(tmp_path):
    _tree(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match="per_class"):
        sample_images_per_class(tmp_path, per_class=0)
