"""An evaluation launcher (k-NN) submits a real `dinov2-eval knn` job to the local SLURM cluster."""

import json
from pathlib import Path

import numpy as np
import pytest
import submitit
from PIL import Image

from dinov2.run.eval.knn import main as submit_knn_main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RED, BLUE = (210, 30, 30), (30, 30, 210)


def _write_images(folder: Path, color, n: int, rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(list(folder.iterdir())), len(list(folder.iterdir())) + n):
        pixels = np.clip(np.array(color) + rng.normal(0, 8, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_knn_launcher_runs_the_evaluation_in_a_job(slurm_cluster, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for cls, color in (("red", RED), ("blue", BLUE)):
        _write_images(tmp_path / "train" / cls, color, 8, rng)
    _write_images(tmp_path / "test" / "blue", BLUE, 6, rng)
    _write_images(tmp_path / "test" / "red", RED, 4, rng)
    _write_images(tmp_path / "test" / "red", BLUE, 2, rng)  # mislabeled: 1-NN must call them blue
    out = tmp_path / "eval"
    argv = [
        "--output-dir", str(out), "--partition", slurm_cluster.partition, "--ngpus", "0",
        "--cpus-per-task", "1", "--timeout", "10",
        "--backbone", "pixels:8", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
        "--k", "1", "--image-size", "16", "--n-boot", "0", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert submit_knn_main(argv) == 0
    job_id = capsys.readouterr().out.split("Submitted job ")[1].split()[0]
    job = submitit.SlurmJob(folder=out / "%j", job_id=job_id)
    slurm_cluster.wait_for_job(job, timeout=150)
    assert job.result() == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # 10 of the 12 test images carry the label of their colour
    assert metrics["summary"]["1-NN"]["accuracy"]["mean"] == pytest.approx(10 / 12)
    assert (out / "results.md").exists() and (out / job_id / f"{job_id}_0_log.out").exists()
