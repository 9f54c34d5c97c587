"""CellImageDataset: discovery, labels, per-root ignored fractions, clear errors, replacement of
files that fail at access time, the corruption check, pickling, and the real PBC folder."""

import logging
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets import CellImageDataset
from dinov2.data.datasets.custom_image_datasets import find_images, ignored_count

PBC_COUNTS = {
    "basophil": 1218,
    "eosinophil": 3117,
    "erythroblast": 1551,
    "ig": 2895,
    "lymphocyte": 1214,
    "monocyte": 1420,
    "neutrophil": 3329,
    "platelet": 2348,
}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def dinov2_logs(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dinov2"), "propagate", True)  # other tests may turn it off
    caplog.set_level(logging.WARNING, logger="dinov2")
    return caplog


def solid(path: Path, value: int, size: int = 4) -> Path:
    """A lossless image whose every pixel is (value, value, value): tells which file was loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "PNG", ".jpeg": "PNG"}.get(path.suffix.lower())  # PNG bytes keep values exact
    Image.new("RGB", (size, size), (value, value, value)).save(path, format=fmt)
    return path


def value_of(image) -> int:
    array = np.asarray(image)
    assert (array == array.flat[0]).all()
    return int(array.flat[0])


def flat_root(root: Path, n: int, start: int = 0) -> list[str]:
    return [str(solid(root / f"img_{i:03d}.png", (start + i) % 256)) for i in range(n)]


# ---------------------------------------------------------------------------------------- discovery


def test_discovery_is_recursive_sorted_any_case_and_skips_hidden(tmp_path):
    root = tmp_path / "root"
    wanted = ["b/x.JPG", "a/z.png", "a/deep/er/y.Tif", "a/w.tiff", "b/v.jpeg", "b/u.BMP", "t.PNG"]
    for i, rel in enumerate(wanted):
        solid(root / rel, i)
    for rel in ["a/.DS_1.jpg", ".hidden/q.png", "a/.cache/r.png", "b/notes.txt", "b/anim.gif", "b/x.jpg.bak"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    expected = sorted(str(root / rel) for rel in wanted)
    assert find_images(root) == expected
    ds = CellImageDataset(root, labeled=False)
    assert ds.paths == expected
    assert ds.roots == [str(root)]


def test_labels_follow_class_folders(tmp_path):
    root = tmp_path / "root"
    files = {"mono/a.png": 10, "mono/b.png": 11, "blast/c.png": 20, "blast/sub/d.png": 21, "zeta/e.png": 30}
    for rel, value in files.items():
        solid(root / rel, value)
    ds = CellImageDataset(root)
    assert ds.labeled
    assert ds.classes == ["blast", "mono", "zeta"]
    assert ds.class_to_idx == {"blast": 0, "mono": 1, "zeta": 2}
    for path, target in ds.samples:
        assert ds.classes[target] == Path(path).relative_to(root).parts[0]
    assert ds.targets == [0, 0, 1, 1, 2]  # sorted paths: blast/c, blast/sub/d, mono/a, mono/b, zeta/e
    for i in range(len(ds)):
        image, target = ds[i]
        rel = os.path.relpath(ds.paths[i], root)
        assert value_of(image) == files[rel] and target == ds.class_to_idx[rel.split(os.sep)[0]]


def test_classes_are_the_union_over_labeled_roots(tmp_path):
    for rel in ["r1/a/1.png", "r1/b/1.png", "r2/b/2.png", "r2/c/2.png", "r2/c/3.png"]:
        solid(tmp_path / rel, 0)
    ds = CellImageDataset([tmp_path / "r1", tmp_path / "r2"])
    assert ds.classes == ["a", "b", "c"]
    names = [(Path(p).parent.parent.name, Path(p).parent.name) for p in ds.paths]
    assert names == [("r1", "a"), ("r1", "b"), ("r2", "b"), ("r2", "c"), ("r2", "c")]  # roots in order
    assert ds.targets == [0, 1, 1, 2, 2]


def test_flat_folder_is_unlabeled_and_refuses_labeled_true(tmp_path):
    flat = tmp_path / "flat"
    flat_root(flat, 3)
    ds = CellImageDataset(flat)
    assert not ds.labeled and ds.classes == [] and ds.class_to_idx == {}
    assert ds.targets == [-1, -1, -1] and ds[0][1] == -1
    with pytest.raises(ValueError, match=f"{flat} is not a class-folder dataset"):
        CellImageDataset(flat, labeled=True)
    # One flat root among labeled ones: auto-detection falls back to unlabeled for all.
    solid(tmp_path / "lab" / "a" / "1.png", 0)
    assert CellImageDataset([tmp_path / "lab", flat]).targets == [-1] * 4
    assert CellImageDataset(tmp_path / "lab", labeled=False).targets == [-1]


def test_transforms_and_load_image(tmp_path):
    solid(tmp_path / "r" / "a" / "x.png", 42)
    ds = CellImageDataset(
        tmp_path / "r", transform=lambda im: value_of(im) + 1, target_transform=lambda t: f"class {t}"
    )
    assert ds[0] == (43, "class 0")
    image = ds.load_image(0)
    assert image.mode == "RGB" and value_of(image) == 42


# ----------------------------------------------------------------------------------- ignore_fraction


@pytest.mark.parametrize(
    "n, fraction, n_ignored",
    [(10, 0.25, 2), (10, 0.3, 3), (10, 0.7, 7), (7, 0.29, 2), (3, 0.5, 1), (5, 0.0, 0)],
)
def test_ignored_count_is_the_floor(tmp_path, n, fraction, n_ignored):
    # Hand-computed floors: 2.5 -> 2, 3 -> 3 (10 * 0.3 is 3.0000000000000004), 7 -> 7 (7.000000000000001),
    # 2.03 -> 2, 1.5 -> 1.
    assert ignored_count(n, fraction) == n_ignored
    all_paths = flat_root(tmp_path / "r", n)
    ds = CellImageDataset(tmp_path / "r", ignore_fraction=fraction, seed=3)
    assert len(ds) == n - n_ignored
    assert set(ds.paths) <= set(all_paths) and ds.paths == sorted(ds.paths)


def test_ignore_fraction_is_deterministic_per_seed(tmp_path):
    flat_root(tmp_path / "r", 20)
    kept = [CellImageDataset(tmp_path / "r", ignore_fraction=0.5, seed=s).paths for s in (0, 0, 1)]
    assert kept[0] == kept[1]
    assert kept[0] != kept[2]  # 1 chance in C(20, 10) = 184756 of a coincidence, and the seeds are fixed
    assert len(kept[0]) == len(kept[2]) == 10


def test_ignored_files_of_a_root_do_not_depend_on_other_roots(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    flat_root(a, 12)
    flat_root(b, 9)
    flat_root(c, 5)

    def kept_in_a(roots, fractions=0.5):
        ds = CellImageDataset(roots, ignore_fraction=fractions, seed=7)
        return [p for p in ds.paths if Path(p).parent == a]

    reference = kept_in_a([a])
    assert len(reference) == 6
    assert kept_in_a([a, b]) == reference
    assert kept_in_a([c, a]) == reference  # another root, before it
    assert kept_in_a([a, b, c], [0.5, 0.2, 0.0]) == reference
    flat_root(b, 15, start=100)  # the other root changes
    assert kept_in_a([a, b]) == reference


def test_one_fraction_per_root(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flat_root(a, 10)
    flat_root(b, 10)
    ds = CellImageDataset([a, b], ignore_fraction=[0.5, 0.0])
    assert sum(Path(p).parent == a for p in ds.paths) == 5
    assert sum(Path(p).parent == b for p in ds.paths) == 10
    with pytest.raises(ValueError, match="ignore_fraction has 3 values but there are 2 dataset roots"):
        CellImageDataset([a, b], ignore_fraction=[0.1, 0.1, 0.1])
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ignore_fraction must be in"):
            CellImageDataset(a, ignore_fraction=bad)
    with pytest.raises(ValueError, match="one number per root"):
        CellImageDataset(a, ignore_fraction="0.1")


def test_class_indices_survive_ignoring_a_whole_small_class(tmp_path):
    root = tmp_path / "r"
    flat_root(root / "big", 19)
    solid(root / "tiny" / "only.png", 1)
    flat_root(root / "zz", 2)
    full = CellImageDataset(root)
    for seed in range(20):  # some seeds drop tiny's only image among the 11 of 22 ignored
        part = CellImageDataset(root, ignore_fraction=0.5, seed=seed)
        assert part.class_to_idx == full.class_to_idx == {"big": 0, "tiny": 1, "zz": 2}
        for path, target in part.samples:
            assert part.classes[target] == Path(path).parent.name


# ------------------------------------------------------------------------------------------ errors


def test_missing_path_is_named(tmp_path):
    solid(tmp_path / "ok" / "a.png", 0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        CellImageDataset([tmp_path / "ok", tmp_path / "missing"])


def test_empty_folder_or_no_images_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no images found in {tmp_path / 'empty'}"):
        CellImageDataset(tmp_path / "empty")
    only_junk = tmp_path / "junk"
    (only_junk / "sub").mkdir(parents=True)
    (only_junk / "sub" / "notes.txt").write_text("x")
    (only_junk / ".DS_9.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=f"no images found in {only_junk}"):
        CellImageDataset(only_junk)
    with pytest.raises(ValueError, match="no dataset root"):
        CellImageDataset([])
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        CellImageDataset(tmp_path / "file.png")


# ------------------------------------------------------------------------------- access-time failures


def test_undecodable_file_is_replaced_by_the_next_and_logged_once(tmp_path, dinov2_logs):
    paths = flat_root(tmp_path / "r", 6)
    ds = CellImageDataset(tmp_path / "r", max_failed_fraction=0.5)
    Path(paths[2]).write_bytes(b"")  # breaks after the dataset was built
    Path(paths[5]).write_text("not an image")
    assert [value_of(ds[i][0]) for i in range(6)] == [0, 1, 3, 3, 4, 0]  # 5 wraps around to 0
    assert value_of(ds[2][0]) == 3
    warnings = [r.getMessage() for r in dinov2_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per file, however often it is asked for
    assert paths[2] in warnings[0] and "zero_bytes" in warnings[0]
    assert paths[5] in warnings[1] and "not_an_image" in warnings[1]


def test_too_many_failures_stop_with_a_clear_error(tmp_path, dinov2_logs):
    paths = flat_root(tmp_path / "r", 10)
    ds = CellImageDataset(tmp_path / "r", max_failed_fraction=0.2)  # up to 2 of 10 may fail
    for i in (0, 5, 8):
        Path(paths[i]).write_bytes(b"")
    assert value_of(ds[0][0]) == 1  # first failure: replaced
    assert value_of(ds[5][0]) == 6  # second: 2 of 10 is not more than 20%
    with pytest.raises(RuntimeError, match=r"3 of 10 images failed to decode .*dinov2-scan"):
        ds[8]


def test_check_corrupted_drops_broken_files(tmp_path, dinov2_logs):
    root = tmp_path / "r"
    good = [str(solid(root / "a" / f"{i}.png", i)) for i in range(3)] + [str(solid(root / "b" / "x.png", 9))]
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("hello")
    data = (root / "b" / "x.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "c").mkdir()
    (root / "c" / "only_broken.png").write_bytes(b"")
    unchecked = CellImageDataset(root)
    assert len(unchecked) == 8
    ds = CellImageDataset(root, check_corrupted=True, scan_workers=0)
    assert ds.paths == sorted(good)
    assert ds.classes == ["a", "b", "c"] and ds.targets == [0, 0, 0, 1]  # "c" keeps its index
    assert any(
        "corruption check" in r.getMessage() and "zero_bytes: 2" in r.getMessage()
        for r in dinov2_logs.records
    )


def test_pickle_round_trip(tmp_path):
    solid(tmp_path / "r" / "a" / "x.png", 5)
    solid(tmp_path / "r" / "b" / "y.png", 6)
    ds = CellImageDataset(tmp_path / "r", transform=np.asarray, ignore_fraction=0.0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == ds.samples and clone.class_to_idx == ds.class_to_idx and clone.roots == ds.roots
    np.testing.assert_array_equal(clone[1][0], ds[1][0])
    assert clone[1][1] == 1


def test_pbc_classes_and_counts(pbc_root):
    ds = CellImageDataset(pbc_root)
    assert ds.classes == sorted(PBC_COUNTS)
    assert {ds.classes[t]: n for t, n in Counter(ds.targets).items()} == PBC_COUNTS
    assert len(ds) == sum(PBC_COUNTS.values()) == 17_092
    assert not any(Path(p).name.startswith(".") for p in ds.paths)  # the stray .DS_169665.jpg is skipped


def test_corruption_check_removes_broken_files_from_the_same_kept_subset(tmp_path):
    root = tmp_path / "r"
    paths = flat_root(root, 20)
    for i in (3, 11):
        Path(paths[i]).write_bytes(b"")  # broken before the dataset is built
    unchecked = CellImageDataset(root, ignore_fraction=0.5, seed=4)
    checked = CellImageDataset(root, ignore_fraction=0.5, seed=4, check_corrupted=True, scan_workers=0)
    assert len(unchecked) == 10  # floor(20 * 0.5) of all 20 files are ignored, broken or not
    broken = {paths[3], paths[11]}
    assert checked.paths == [p for p in unchecked.paths if p not in broken]
