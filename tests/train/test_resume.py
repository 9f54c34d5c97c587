"""Exact resume: a CPU float32 run killed with SIGKILL and restarted ends with weights identical to an
uninterrupted run of the same length (dinov2/train/train.py, dinov2/data/loaders.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.train import checkpointing

TINY = [
    "student.depth=2",
    "train.batch_size_per_gpu=4",
    "crops.local_crops_number=2",
    "train.OFFICIAL_EPOCH_LENGTH=4",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "train.log_period_iterations=1",
    "train.checkpoint_period_iterations=2",
    "train.checkpoint_keep=10",
    "train.collapse_check_period_iterations=3",
    "dino.head_n_prototypes=64",
    "ibot.head_n_prototypes=64",
    "student.drop_path_rate=0.2",  # stochastic depth: the model's own RNG must be restored too
]


def _command(data, out, *extra):
    return [sys.executable, "dinov2/train/train.py", "--config-file", "train/vit_tiny_cpu", "--output-dir",
            str(out), f"train.dataset_path={data}", *TINY, *extra]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _final_state(out, iteration):
    return checkpointing.load_checkpoint_file(out / "checkpoints" / checkpointing.checkpoint_name(iteration))


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    data = generate_synthetic_cells(tmp_path / "cells", per_class=3, size=48, seed=0, progress=False)

    # Uninterrupted reference, loading in the main process.
    ref = tmp_path / "ref"
    subprocess.run(_command(data, ref, "train.num_workers=0"), env=_env(), check=True, timeout=300,
                   capture_output=True)  # fmt: skip

    # Same run with a loader worker, killed with SIGKILL right after its iteration-4 checkpoint ...
    run = tmp_path / "run"
    proc = subprocess.Popen(_command(data, run, "train.num_workers=1"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "model_0000004.pth").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "model_0000008.pth").exists()

    # ... then restarted with the same command: it resumes from iteration 4 and finishes.
    subprocess.run(_command(data, run, "train.num_workers=1"), env=_env(), check=True, timeout=300,
                   capture_output=True)  # fmt: skip

    expected, got = _final_state(ref, 8), _final_state(run, 8)
    assert expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key  # student, teacher and loss centers
    for pid, moments in expected["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(got["optimizer"]["state"][pid][name], value), (pid, name)
    assert got["sampler"] == expected["sampler"] and got["sampler"]["position"] == 8 * 4
    # Log lines of iterations 5+ may appear twice (before the kill and after); the last ones agree.
    import json

    def last_losses(out):
        lines = [json.loads(x) for x in (out / "training_metrics.jsonl").read_text().splitlines()]
        return {r["iteration"]: r["total_loss"] for r in lines}

    assert last_losses(run) == last_losses(ref)
