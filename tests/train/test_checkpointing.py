"""Atomic checkpoint writes, write errors, retention, newest-valid resume, RNG capture
(dinov2/train/checkpointing.py)."""

import errno
import logging
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinov2.train import checkpointing as ckpt
from dinov2.utils import files


def _state(iteration, value=1.0):
    return {"model": {"w": torch.full((4,), value)}, "optimizer": {"state": {}}, "iteration": iteration}


def test_roundtrip_and_names(tmp_path):
    path = ckpt.save_checkpoint(_state(12, 3.0), tmp_path, keep=3)
    assert path.name == "model_0000012.pth"
    loaded = ckpt.load_checkpoint_file(path)
    assert loaded["iteration"] == 12 and torch.equal(loaded["model"]["w"], torch.full((4,), 3.0))


def test_keeps_only_newest_k(tmp_path):
    for it in (2, 4, 6, 8):
        ckpt.save_checkpoint(_state(it), tmp_path, keep=2)
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]


def test_failed_write_leaves_no_partial_file_and_keeps_old_content(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_state(4, 1.0), tmp_path, keep=3)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL")  # some bytes reach the disk, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_state(4, 2.0), tmp_path, keep=3)  # overwrite attempt
    with pytest.raises(OSError):
        ckpt.save_checkpoint(_state(6, 2.0), tmp_path, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000004.pth"]  # no temp files left
    assert torch.equal(ckpt.load_checkpoint_file(tmp_path / "model_0000004.pth")["model"]["w"], torch.ones(4))


def test_process_killed_during_write_never_leaves_final_name(tmp_path):
    # A child writes a checkpoint whose serialisation stalls half-way; we SIGKILL it mid-write.
    code = f"""
import time, torch
from dinov2.train import checkpointing as ckpt
real = torch.save
def slow_save(obj, f, *a, **k):
    f.write(b"x" * 100000); f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
ckpt.save_checkpoint({{"model": {{}}, "optimizer": {{}}, "iteration": 8}}, {str(tmp_path)!r}, keep=3)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        assert proc.stdout.readline().strip() == b"writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (tmp_path / "model_0000008.pth").exists()
    assert ckpt.list_checkpoints(tmp_path) == []  # the orphaned temp file is not a checkpoint
    assert ckpt.load_latest_valid(tmp_path) is None


def test_truncated_newest_is_skipped_with_warning(tmp_path, caplog):
    ckpt.save_checkpoint(_state(2, 1.0), tmp_path, keep=3)
    newest = ckpt.save_checkpoint(_state(4, 2.0), tmp_path, keep=3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    (tmp_path / "model_0000006.pth").write_bytes(b"")  # and an empty file
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        state, path = ckpt.load_latest_valid(tmp_path)
    assert state["iteration"] == 2 and path.name == "model_0000002.pth"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "iteration 6" in warned and "iteration 4" in warned


def test_non_training_dict_is_rejected(tmp_path):
    torch.save({"teacher": {}}, tmp_path / "model_0000003.pth")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ckpt.load_checkpoint_file(tmp_path / "model_0000003.pth")
    assert ckpt.load_latest_valid(tmp_path) is None


def test_rng_capture_restore_survives_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    ckpt.atomic_torch_save(state, tmp_path / "rng.pth")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert random.random() == expected[0]
    assert np.random.rand(3).tolist() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_export_teacher_layout(tmp_path):
    sd = {"backbone.cls_token": torch.ones(1, 1, 4), "dino_head.last_layer.weight": torch.zeros(2, 4)}
    path = ckpt.export_teacher(sd, tmp_path, 250)
    assert path == tmp_path / "eval" / "250" / "teacher_checkpoint.pth"
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"teacher"} and torch.equal(
        loaded["teacher"]["backbone.cls_token"], sd["backbone.cls_token"]
    )


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        ckpt.save_checkpoint(_state(1), tmp_path, keep=0)


def test_disk_full_raises_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_state(2, 1.0), tmp_path, keep=3)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PARTIAL")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointWriteError) as caught:
        ckpt.save_checkpoint(_state(4, 2.0), tmp_path, keep=1)  # keep=1: nothing is pruned on failure
    monkeypatch.setattr(torch, "save", real_save)
    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert error.filename == str(tmp_path / "model_0000004.pth")
    assert str(error) == f"[Errno 28] No space left on device: '{tmp_path / 'model_0000004.pth'}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000002.pth"]
    loaded = torch.load(tmp_path / "model_0000002.pth", map_location="cpu", weights_only=True)
    assert loaded["iteration"] == 2 and torch.equal(loaded["model"]["w"], torch.ones(4))


def test_permission_error_names_the_file(tmp_path, monkeypatch):
    # Root ignores file modes, so the refusal is simulated where the file would be created.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(files, "_create_temporary_sibling", refuse)
    target = tmp_path / "eval" / "7" / "teacher_checkpoint.pth"
    with pytest.raises(ckpt.CheckpointWriteError, match="Permission denied") as caught:
        ckpt.export_teacher({"w": torch.ones(2)}, tmp_path, 7)
    assert caught.value.errno == errno.EACCES and caught.value.filename == str(target)


def test_protected_checkpoints_survive_rotation(tmp_path):
    for it in (2, 4, 6, 8):
        ckpt.save_checkpoint(_state(it), tmp_path, keep=1, protect=(4,))
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8]
    ckpt.save_checkpoint(_state(10), tmp_path, keep=1)  # protection lifted: rotation resumes
    assert [it for it, _ in ckpt.list_checkpoints(tmp_path)] == [10]
    assert ckpt.checkpoint_iteration(tmp_path / "model_0000010.pth") == 10
    with pytest.raises(ValueError, match="not a training checkpoint name"):
        ckpt.checkpoint_iteration("teacher_checkpoint.pth")
