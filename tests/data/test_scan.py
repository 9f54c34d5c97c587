"""dinov2.data.scan: planted problems are found, the cache spares decodes, quarantine moves exactly
the broken files, the CLI exit codes, and the real PBC folder (17,092 images and one stray file)."""

import csv
import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.data import scan
from dinov2.data.datasets.custom_image_datasets import IMAGE_EXTENSIONS, CellImageDataset, find_images

BROKEN = {
    "blast/empty.jpg": "zero_bytes",
    "blast/cut.jpg": "truncated",
    "mono/cut.png": "truncated",
    "mono/notes.jpg": "not_an_image",
}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Nothing is written in $HOME; the scanner's default cache goes below tmp_path."""
    monkeypatch.setenv("DINOV2_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "scan"


def _save(array, path: Path, mode=None, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs)


def make_tree(root: Path) -> tuple[list[str], dict[str, str]]:
    """A small class-folder tree: odd-but-valid images, the four planted problems, hidden entries.

    Returns the valid paths and {broken path: problem}, as strings the way find_images builds them.
    """
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    _save(rgb, root / "blast" / "good.jpg")
    _save(rgb, root / "blast" / "UPPER.JPEG")
    _save(rgb[..., 0], root / "blast" / "gray.png", mode="L")
    _save(np.dstack([rgb, rgb[..., :1]]), root / "mono" / "rgba.png", mode="RGBA")
    _save((rgb[..., 0].astype(np.uint16) * 257), root / "mono" / "deep16.tif")
    _save(rgb, root / "mono" / "nested" / "deeper.bmp")
    palette = Image.fromarray(rng.integers(0, 4, (24, 24), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(root / "mono" / "palette.png", transparency=2)
    cmyk = Image.new("CMYK", (24, 24), (10, 200, 30, 5))
    cmyk.save(root / "mono" / "ink.tiff")

    (root / "blast" / "empty.jpg").write_bytes(b"")
    data = (root / "blast" / "good.jpg").read_bytes()
    (root / "blast" / "cut.jpg").write_bytes(data[: len(data) // 2])
    _save(rgb, root / "mono" / "whole.png")
    data = (root / "mono" / "whole.png").read_bytes()
    (root / "mono" / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "mono" / "whole.png").unlink()
    (root / "mono" / "notes.jpg").write_text("not a picture\n")

    # Skipped by discovery: hidden files (even broken, even named .jpg), hidden folders, other types.
    (root / "mono" / ".DS_0001.jpg").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(b"")
    (root / "mono" / "readme.txt").write_text("scanner notes")

    valid = [
        "blast/good.jpg",
        "blast/UPPER.JPEG",
        "blast/gray.png",
        "mono/rgba.png",
        "mono/deep16.tif",
        "mono/nested/deeper.bmp",
        "mono/palette.png",
        "mono/ink.tiff",
    ]
    as_found = lambda rel: os.path.join(str(root), *rel.split("/"))  # noqa: E731
    return sorted(as_found(r) for r in valid), {as_found(r): p for r, p in BROKEN.items()}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    valid, broken = make_tree(root)
    return root, valid, broken


def _problems_by_path(report) -> dict[str, str]:
    return {path: problem for problem, items in report.problems.items() for path, _ in items}


class DecodeCounter:
    """Stands in for the decoder the scanner's worker calls, counting the files it decodes."""

    def __init__(self, real):
        self.real, self.paths = real, []

    def __call__(self, path, **kwargs):
        self.paths.append(str(path))
        return self.real(path, **kwargs)


@pytest.fixture
def counter(monkeypatch):
    counting = DecodeCounter(scan.decode_rgb)
    monkeypatch.setattr(scan, "decode_rgb", counting)
    return counting


# ---------------------------------------------------------------------------------------- finding


def test_planted_problems_are_reported_and_odd_valid_images_are_not(tree):
    root, valid, broken = tree
    report = scan.scan_images(root, workers=1, progress=False)
    assert _problems_by_path(report) == broken
    assert report.ok == valid
    assert report.n_files == len(valid) + len(broken) == 12
    assert report.n_broken == 4
    assert report.n_cached == 0
    assert list(report.problems) == ["zero_bytes", "truncated", "not_an_image"]  # PROBLEMS order
    assert report.hidden == [str(root / ".thumbnails") + os.sep, str(root / "mono" / ".DS_0001.jpg")]


def test_worker_pool_gives_the_same_report(tree):
    root, valid, broken = tree
    report = scan.scan_images(root, workers=2, progress=False, use_cache=False)
    assert report.ok == valid
    assert _problems_by_path(report) == broken


def test_discovery_matches_the_dataset(tmp_path):
    # scan.py repeats find_images' rules (to avoid importing torch); both must see the same files.
    assert scan.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS
    root = tmp_path / "r"
    make_tree(root)
    (root / "mono" / "x.Tif").write_bytes(b"")
    (root / "._resource.png").write_bytes(b"")
    (root / ".ipynb_checkpoints" / "sub").mkdir(parents=True)
    (root / ".ipynb_checkpoints" / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.png").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", root / "link")  # followed, like find_images does
    for given in (str(root), str(root) + os.sep, os.path.relpath(root)):
        assert scan.list_root(given).images == find_images(given)
    images = scan.list_root(str(root)).images
    assert str(root / "link" / "linked.png") in images and str(root / "mono" / "x.Tif") in images


def test_several_roots_are_scanned_once_each(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _save(np.zeros((4, 4, 3), np.uint8), a / "x" / "1.png")
    _save(np.zeros((4, 4, 3), np.uint8), b / "x" / "1.png")
    (b / "x" / "2.png").write_bytes(b"")
    report = scan.scan_images([a, b, a], workers=0, progress=False)
    assert report.ok == [str(a / "x" / "1.png"), str(b / "x" / "1.png")]
    assert report.problems == {"zero_bytes": [(str(b / "x" / "2.png"), "file is empty")]}
    assert report.n_files == 3


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan.scan_images(tmp_path / "nowhere", workers=0, progress=False)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        scan.scan_images(tmp_path / "file.png", workers=0, progress=False)


def test_summary_groups_paths_by_problem_and_lists_hidden_files(tree):
    root, valid, broken = tree
    text = scan.scan_images(root, workers=0, progress=False).summary()
    lines = text.splitlines()
    assert lines[0].startswith("scanned 12 image files in 1 root(s): 8 ok, 4 broken")
    block = lines[lines.index("truncated: 2") + 1 : lines.index("truncated: 2") + 3]
    assert [line.split()[0] for line in block] == sorted(p for p, k in broken.items() if k == "truncated")
    assert "zero_bytes: 1" in lines and "not_an_image: 1" in lines
    assert any(
        str(root / "mono" / ".DS_0001.jpg") in line for line in lines[lines.index("not_an_image: 1") :]
    )
    assert all(p not in text for p in valid)
    short = scan.scan_images(root, workers=0, progress=False).summary(max_paths=1)
    assert "  ... and 1 more" in short.splitlines()


def test_csv_has_one_row_per_file(tree, tmp_path):
    root, valid, broken = tree
    report = scan.scan_images(root, workers=0, progress=False)
    out = tmp_path / "report.csv"
    report.to_csv(out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "status", "detail"]
    assert len(rows) == report.n_files == 12
    assert {r["path"]: r["status"] for r in rows} == {**{p: "ok" for p in valid}, **broken}
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)


# ------------------------------------------------------------------------------------------ cache


def test_cache_file_is_named_by_the_root_and_written_atomically(tree, cache_in_tmp):
    root, valid, broken = tree
    scan.scan_images(root, workers=0, progress=False)
    name = hashlib.sha1(os.path.abspath(root).encode()).hexdigest() + ".json"
    assert sorted(os.listdir(cache_in_tmp)) == [name]  # no temporary file left behind
    entries = json.loads((cache_in_tmp / name).read_text())["entries"]
    assert sorted(entries) == sorted(os.path.relpath(p, root) for p in valid + list(broken))
    good = root / "blast" / "good.jpg"
    st = good.stat()
    assert entries["blast/good.jpg"] == [st.st_size, st.st_mtime_ns, "ok", ""]


def test_rescan_uses_the_cache_and_decodes_nothing(tree, counter):
    root, valid, broken = tree
    first = scan.scan_images(root, workers=1, progress=False)
    assert sorted(counter.paths) == sorted(valid + list(broken))  # every file decoded once
    counter.paths.clear()
    inode = scan.cache_file(root).stat().st_ino
    second = scan.scan_images(root, workers=1, progress=False)
    assert counter.paths == []
    assert scan.cache_file(root).stat().st_ino == inode  # nothing changed, so nothing rewritten
    assert second.n_cached == second.n_files == 12
    assert (second.ok, second.problems, second.hidden) == (first.ok, first.problems, first.hidden)


def test_changed_new_and_removed_files(tree, counter):
    root, valid, broken = tree
    scan.scan_images(root, workers=1, progress=False)
    counter.paths.clear()

    changed = root / "blast" / "good.jpg"  # was fine, now cut short
    data = changed.read_bytes()
    old = changed.stat()
    changed.write_bytes(data[: len(data) // 2])
    os.utime(changed, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    added = root / "blast" / "new.png"
    _save(np.full((5, 5, 3), 7, np.uint8), added)
    removed = root / "mono" / "notes.jpg"
    removed.unlink()

    report = scan.scan_images(root, workers=1, progress=False)
    assert sorted(counter.paths) == sorted([str(changed), str(added)])
    assert report.n_files == 12 and report.n_cached == 10
    problems = _problems_by_path(report)
    assert problems[str(changed)] == "truncated"
    assert str(added) in report.ok
    assert str(removed) not in problems and str(removed) not in report.ok
    entries = json.loads(scan.cache_file(root).read_text())["entries"]
    assert "mono/notes.jpg" not in entries and "blast/new.png" in entries


def test_same_mtime_but_new_size_is_decoded_again(tree, counter):
    root, valid, broken = tree
    scan.scan_images(root, workers=1, progress=False)
    counter.paths.clear()
    target = root / "mono" / "notes.jpg"
    old = target.stat()
    target.write_text("a longer text that is still not a picture\n")
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    scan.scan_images(root, workers=1, progress=False)
    assert counter.paths == [str(target)]


def test_broken_cache_is_ignored_with_a_warning(tree, counter, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dinov2"), "propagate", True)  # other tests may turn it off
    root, valid, broken = tree
    scan.scan_images(root, workers=1, progress=False)
    scan.cache_file(root).write_text('{"entries": {"blast/good.jpg": [1, 2')  # cut off mid-write
    counter.paths.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        report = scan.scan_images(root, workers=1, progress=False)
    assert report.n_cached == 0 and len(counter.paths) == 12
    assert any("ignoring unreadable scan cache" in r.getMessage() for r in caplog.records)
    assert _problems_by_path(report) == broken
    json.loads(scan.cache_file(root).read_text())  # rewritten whole


def test_no_cache_neither_reads_nor_writes(tree, counter, cache_in_tmp):
    root, valid, broken = tree
    scan.scan_images(root, workers=1, progress=False, use_cache=False)
    assert not cache_in_tmp.exists()
    scan.scan_images(root, workers=1, progress=False)
    counter.paths.clear()
    report = scan.scan_images(root, workers=1, progress=False, use_cache=False)
    assert len(counter.paths) == 12 and report.n_cached == 0


def test_other_size_limit_does_not_reuse_verdicts(tree, counter):
    root, valid, broken = tree
    scan.scan_images(root, workers=1, progress=False)
    report = scan.scan_images(root, workers=1, progress=False, max_pixels=24 * 24 - 1)
    assert report.n_cached == 0
    too_large = dict(report.problems["too_large"])
    assert set(valid) <= set(too_large)  # every image is 24x24 = 576 pixels
    assert all(detail == "24x24 exceeds 575 pixels" for detail in too_large.values())
    assert report.ok == []


# ------------------------------------------------------------------------------------ quarantine


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_quarantine_moves_exactly_the_broken_files(tree, tmp_path, capsys):
    root, valid, broken = tree
    before = _snapshot(root)
    quarantine = tmp_path / "quarantine"
    csv_path = tmp_path / "scan.csv"
    assert (
        scan.main([str(root), "--quarantine", str(quarantine), "--report", str(csv_path), "--workers", "1"])
        == 1
    )
    after = _snapshot(root)
    moved = _snapshot(quarantine)
    rel_broken = {os.path.relpath(p, root) for p in broken}
    assert set(moved) == rel_broken  # relative paths kept
    assert {k: before[k] for k in rel_broken} == moved  # bytes unchanged
    assert after == {k: v for k, v in before.items() if k not in rel_broken}  # the rest untouched
    out = capsys.readouterr().out
    assert "zero_bytes: 1" in out and f"moved 4 broken file(s) into {quarantine}" in out
    assert f"{root / 'blast' / 'empty.jpg'} -> {quarantine / 'blast' / 'empty.jpg'}" in out
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 12

    # The cache no longer claims the moved files; the tree is now clean.
    entries = json.loads(scan.cache_file(root).read_text())["entries"]
    assert not rel_broken & set(entries)
    assert scan.main([str(root), "--workers", "1", "--no-progress"]) == 0


def test_quarantine_never_overwrites(tree, tmp_path):
    root, valid, broken = tree
    quarantine = tmp_path / "quarantine"
    (quarantine / "blast").mkdir(parents=True)
    (quarantine / "blast" / "empty.jpg").write_bytes(b"an earlier quarantined file")
    (quarantine / "blast" / "empty_1.jpg").write_bytes(b"and another")
    report = scan.scan_images(root, workers=0, progress=False)
    moved = dict(scan.quarantine(report, quarantine))
    assert moved[str(root / "blast" / "empty.jpg")] == str(quarantine / "blast" / "empty_2.jpg")
    assert (quarantine / "blast" / "empty.jpg").read_bytes() == b"an earlier quarantined file"
    assert (quarantine / "blast" / "empty_1.jpg").read_bytes() == b"and another"
    assert (quarantine / "blast" / "empty_2.jpg").read_bytes() == b""
    assert len(moved) == 4


def test_quarantine_forgets_moved_files_in_every_enclosing_root(tree, tmp_path):
    root, valid, broken = tree
    inner = root / "blast"
    report = scan.scan_images([inner, root], workers=0, progress=False)
    assert report.n_files == 12  # files of the inner root are counted once
    moved = dict(scan.quarantine(report, tmp_path / "q"))
    # Relative to the first root that holds them: blast/empty.jpg -> q/empty.jpg, mono/x -> q/mono/x.
    assert moved[str(inner / "empty.jpg")] == str(tmp_path / "q" / "empty.jpg")
    assert moved[str(root / "mono" / "notes.jpg")] == str(tmp_path / "q" / "mono" / "notes.jpg")
    inner_cache = json.loads(scan.cache_file(inner).read_text())["entries"]
    outer_cache = json.loads(scan.cache_file(root).read_text())["entries"]
    assert sorted(inner_cache) == ["UPPER.JPEG", "good.jpg", "gray.png"]
    assert sorted(outer_cache) == sorted(os.path.relpath(p, root) for p in valid)


def test_move_keeps_the_file_when_the_target_is_taken(tmp_path):
    src, dst = tmp_path / "a.jpg", tmp_path / "out" / "a.jpg"
    src.write_bytes(b"one")
    dst.parent.mkdir()
    dst.write_bytes(b"two")
    assert scan.move_no_overwrite(src, dst) == tmp_path / "out" / "a_1.jpg"
    assert (
        not src.exists()
        and dst.read_bytes() == b"two"
        and (tmp_path / "out" / "a_1.jpg").read_bytes() == b"one"
    )


# --------------------------------------------------------------------------------------------- CLI


def test_cli_clean_tree_exits_0(tmp_path, capsys):
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "clean" / "c" / "a.png")
    assert scan.main([str(tmp_path / "clean"), "--workers", "0", "--no-progress"]) == 0
    assert "1 ok, 0 broken" in capsys.readouterr().out


def test_cli_missing_root_exits_2_with_a_message(tmp_path, capsys):
    assert scan.main([str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"root does not exist: {tmp_path / 'nope'}" in err and "Traceback" not in err


def test_cli_refuses_a_quarantine_inside_the_root(tree, capsys):
    root, valid, broken = tree
    before = _snapshot(root)
    assert scan.main([str(root), "--quarantine", str(root / "bad"), "--workers", "0"]) == 2
    assert "inside the scanned root" in capsys.readouterr().err
    assert _snapshot(root) == before
    # A hidden folder inside the root is invisible to discovery, so it is allowed.
    assert scan.main([str(root), "--quarantine", str(root / ".quarantine"), "--workers", "0"]) == 1
    assert set(_snapshot(root / ".quarantine")) == {os.path.relpath(p, root) for p in broken}


# ------------------------------------------------------------------------------------------- PBC


@pytest.mark.slow
def test_pbc_scan_and_checked_dataset(pbc_root, cache_in_tmp):
    ds = CellImageDataset(pbc_root, check_corrupted=True, scan_workers=2)  # full decode, 2 processes
    assert len(ds) == 17_092
    assert ds.classes == ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
                          "neutrophil", "platelet"]  # fmt: skip
    report = scan.scan_images(pbc_root, workers=2, progress=False)  # the dataset's scan, cached
    assert report.n_cached == report.n_files == len(report.ok) == 17_092
    assert report.n_broken == 0
    assert report.hidden == [str(pbc_root / "neutrophil" / ".DS_169665.jpg")]
    assert "skipped 1 hidden file(s)/folder(s)" in report.summary()


def test_move_across_file_systems_copies_then_unlinks(tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(scan.os, "link", no_hard_links)
    src, dst = tmp_path / "a.png", tmp_path / "q" / "a.png"
    src.write_bytes(b"broken bytes")
    os.utime(src, ns=(1_000_000_000, 2_000_000_000))
    dst.parent.mkdir()
    dst.write_bytes(b"already here")
    assert scan.move_no_overwrite(src, dst) == tmp_path / "q" / "a_1.png"
    assert not src.exists() and dst.read_bytes() == b"already here"
    copied = tmp_path / "q" / "a_1.png"
    assert copied.read_bytes() == b"broken bytes" and copied.stat().st_mtime_ns == 2_000_000_000
