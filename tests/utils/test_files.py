"""Tests of dinov2/utils/files.py: the one atomic write (permissions, survival on failure, fsync)."""

import os
import stat

import pytest
import torch

from dinov2.utils import files
from dinov2.utils.files import atomic_path, atomic_torch_save, atomic_write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_new_file_gets_umask_permissions_not_mkstemp_0600(tmp_path, umask_027):
    path = atomic_write(tmp_path / "a" / "b.json", '{"x": 1}')
    assert path.read_text() == '{"x": 1}'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask_027  # 0o640, as open() would give


def test_text_is_written_as_given_and_bytes_untouched(tmp_path):
    atomic_write(tmp_path / "t.txt", "a\r\nb\u00e9")
    assert (tmp_path / "t.txt").read_bytes() == "a\r\nb\u00e9".encode()
    atomic_write(tmp_path / "b.bin", bytes(range(256)))
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256))


def test_old_file_survives_a_failing_write_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_torch_save_failure_keeps_old_checkpoint(tmp_path):
    target = tmp_path / "last.pth"
    atomic_torch_save({"w": torch.arange(3)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    with pytest.raises(TypeError, match="cannot pickle"):
        atomic_torch_save({"w": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_temporary_name_is_hidden_sibling_with_target_suffix(tmp_path):
    with atomic_path(tmp_path / "feats.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".npz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "feats.npz").read_bytes() == b"x"


def test_content_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "x", "data")
    assert events[:2] == ["fsync", "replace"]
