"""Tests of dinov2/data/split.py: stratified, disjoint, complete, deterministic, SRC untouched."""

import hashlib
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from dinov2.data.split import (
    MANIFEST_NAME,
    SPLIT_NAMES,
    largest_remainder_counts,
    main,
    plan_split,
    split_dataset,
)

CLASS_SIZES = {"basophil": 13, "eosinophil": 7, "ig": 2, "platelet": 1}


def _make_dataset(root: Path) -> dict[str, set[str]]:
    """Tiny PNG class folders (one nested subfolder, a hidden file); returns class -> relative paths."""
    expected: dict[str, set[str]] = {}
    for k, (cls, n) in enumerate(CLASS_SIZES.items()):
        expected[cls] = set()
        for i in range(n):
            rel = f"sub/img_{i:03d}.png" if (cls == "basophil" and i % 4 == 0) else f"img_{i:03d}.png"
            path = root / cls / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (10 * k, 5 * i, 100)).save(path)
            expected[cls].add(rel)
    (root / "basophil" / ".hidden.png").write_bytes(b"not an image")
    return expected


def _tree_fingerprint(root: Path) -> dict[str, tuple[str, float, bool]]:
    """Every entry under root -> (sha256 of content, mtime, is symlink)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p.relative_to(root))] = (digest, p.lstat().st_mtime, p.is_symlink())
    return out


def _listing(out: Path) -> dict[str, dict[str, set[str]]]:
    """split -> class -> relative image paths found under out (symlinks included)."""
    res: dict[str, dict[str, set[str]]] = {}
    for split in SPLIT_NAMES:
        res[split] = {}
        for cls_dir in sorted((out / split).iterdir()):
            files = {str(p.relative_to(cls_dir)) for p in cls_dir.rglob("*") if p.is_file()}
            res[split][cls_dir.name] = files
    return res


@pytest.fixture()
def src(tmp_path) -> Path:
    root = tmp_path / "src"
    _make_dataset(root)
    return root


def test_largest_remainder_hand_examples():
    assert largest_remainder_counts(10, (0.7, 0.2, 0.1)) == [7, 2, 1]
    # quotas 1.4 / 0.4 / 0.2 -> floors 1/0/0; the one left over: TRN and VAL tie at .4 -> TRN
    assert largest_remainder_counts(2, (0.7, 0.2, 0.1)) == [2, 0, 0]
    # quotas 1.8 / 0.6 / 0.6 -> floors 1/0/0; two left: TRN (.8), then VAL (.6, earlier than TST)
    assert largest_remainder_counts(3, (0.6, 0.2, 0.2)) == [2, 1, 0]
    # quotas 3.5 / 1.0 / 0.5 -> floors 3/1/0; remainders tie at 0.5 -> earlier split (TRN) wins
    assert largest_remainder_counts(5, (0.7, 0.2, 0.1)) == [4, 1, 0]
    assert largest_remainder_counts(3, (1 / 3, 1 / 3, 1 / 3)) == [1, 1, 1]
    # 852.6 / 243.6 / 121.8: floors leave 2; TST (.8) first, then TRN and VAL tie at .6 -> TRN
    # (in binary floating point 1218 * 0.2 > 243.6 > 1218 * 0.7 - 852, which must not decide it)
    assert largest_remainder_counts(1218, (0.7, 0.2, 0.1)) == [853, 243, 122]
    assert largest_remainder_counts(0, (0.7, 0.2, 0.1)) == [0, 0, 0]


def test_largest_remainder_properties():
    rng = random.Random(0)
    for _ in range(500):
        raw = [rng.random() for _ in range(3)]
        ratios = [r / sum(raw) for r in raw]
        n = rng.randint(0, 1000)
        counts = largest_remainder_counts(n, ratios)
        assert sum(counts) == n
        assert all(abs(c - n * r) < 1 for c, r in zip(counts, ratios))


def test_split_is_stratified_disjoint_complete(src, tmp_path):
    expected = {
        cls: {str(p.relative_to(src / cls)) for p in (src / cls).rglob("*.png")} for cls in CLASS_SIZES
    }
    expected["basophil"].discard(".hidden.png")
    counts = split_dataset(src, tmp_path / "out", (0.7, 0.2, 0.1), seed=3)
    listing = _listing(tmp_path / "out")
    for cls, files in expected.items():
        per_split = [listing[s][cls] for s in SPLIT_NAMES]
        # stratified: each class follows the ratios with largest-remainder rounding
        assert [len(f) for f in per_split] == largest_remainder_counts(len(files), (0.7, 0.2, 0.1))
        assert [counts[s][cls] for s in SPLIT_NAMES] == [len(f) for f in per_split]
        # disjoint and complete
        assert set.union(*per_split) == files
        assert sum(len(f) for f in per_split) == len(files)
    # every split has every class folder (a 1-image class leaves VAL/TST folders empty)
    assert all(set(listing[s]) == set(CLASS_SIZES) for s in SPLIT_NAMES)
    # default mode: symlinks to the source files
    for link in (tmp_path / "out" / "TRN" / "basophil").rglob("*.png"):
        assert link.is_symlink() and Path(os.readlink(link)).is_absolute()
        assert os.path.samefile(
            link, src / "basophil" / link.relative_to(tmp_path / "out" / "TRN" / "basophil")
        )
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


def test_split_is_deterministic_and_seed_dependent(src, tmp_path):
    split_dataset(src, tmp_path / "a", seed=7)
    split_dataset(src, tmp_path / "b", seed=7)
    split_dataset(src, tmp_path / "c", seed=8)
    a, b, c = (_listing(tmp_path / n) for n in "abc")
    assert a == b
    assert a["TRN"]["basophil"] != c["TRN"]["basophil"]  # 13 choose 9: a collision is ~1e-3 unlikely
    # seeding is per class: adding a class does not reshuffle the others
    plan1 = plan_split({"x": [f"x{i}" for i in range(20)]}, (0.5, 0.3, 0.2), seed=1)
    plan2 = plan_split({"x": [f"x{i}" for i in range(20)], "y": ["y0", "y1"]}, (0.5, 0.3, 0.2), seed=1)
    assert all(plan1[s]["x"] == plan2[s]["x"] for s in SPLIT_NAMES)


def test_source_is_never_modified(src, tmp_path):
    before = _tree_fingerprint(src)
    split_dataset(src, tmp_path / "out", seed=0, mode="symlink")
    split_dataset(src, tmp_path / "out", seed=1, mode="copy", overwrite=True)
    assert _tree_fingerprint(src) == before


def test_copy_mode_copies_bytes(src, tmp_path):
    split_dataset(src, tmp_path / "out", seed=0, mode="copy")
    copied = sorted((tmp_path / "out").rglob("*.png"))
    assert len(copied) == sum(CLASS_SIZES.values())
    for p in copied:
        assert not p.is_symlink()
        split, cls = p.relative_to(tmp_path / "out").parts[:2]
        original = src / cls / p.relative_to(tmp_path / "out" / split / cls)
        assert p.read_bytes() == original.read_bytes()


def test_refuses_non_empty_output(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        split_dataset(src, out)
    assert main([str(src), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # --overwrite replaces only a previous split, never foreign files
    with pytest.raises(ValueError, match="did not write"):
        split_dataset(src, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    split_dataset(src, out, seed=0)
    first = _listing(out)
    with pytest.raises(ValueError, match="not empty"):
        split_dataset(src, out, seed=1)
    split_dataset(src, out, seed=1, overwrite=True)
    assert _listing(out) != first
    assert not [p for p in out.iterdir() if p.name.startswith(".split-tmp")]


def test_bad_arguments(src, tmp_path, capsys):
    with pytest.raises(ValueError, match="sum to 1"):
        split_dataset(src, tmp_path / "o1", (0.7, 0.2, 0.2))
    with pytest.raises(ValueError, match=">= 0"):
        split_dataset(src, tmp_path / "o2", (1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="mode"):
        split_dataset(src, tmp_path / "o3", mode="hardlink")
    with pytest.raises(FileNotFoundError, match="missing"):
        split_dataset(tmp_path / "missing", tmp_path / "o4")
    with pytest.raises(ValueError, match="outside"):
        split_dataset(src, src / "nested_out")
    assert not (src / "nested_out").exists()
    assert main([str(src), str(tmp_path / "o5"), "--ratios", "0.5", "0.6", "0.1"]) == 2
    assert "sum to 1" in capsys.readouterr().err


def test_cli_prints_counts_table(src, tmp_path, capsys):
    assert (
        main([str(src), str(tmp_path / "out"), "--ratios", "0.6", "0.2", "0.2", "--seed", "1", "--copy"]) == 0
    )
    text = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in text.splitlines()
        if line and line.split()[0] in CLASS_SIZES
    }
    for cls, n in CLASS_SIZES.items():
        assert rows[cls] == [str(n)] + [str(c) for c in largest_remainder_counts(n, (0.6, 0.2, 0.2))]
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert total_line.split()[1] == str(sum(CLASS_SIZES.values()))
