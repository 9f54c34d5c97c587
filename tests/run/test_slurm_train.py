"""Real DINOv2 training through the SLURM launcher: 2 CPU tasks (gloo) on the local test cluster."""

import json
from pathlib import Path

import pytest
import submitit
import torch

from dinov2.run.submit import submit_jobs
from dinov2.run.train.train import TrainTask, get_parser
from dinov2.run.train.train import main as submit_train_main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "dinov2" / "configs" / "train" / "vit_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    from dinov2.data.synthetic import generate_synthetic_cells

    return Path(
        generate_synthetic_cells(tmp_path_factory.mktemp("cells"), per_class=3, size=64, progress=False)
    )


def _argv(cluster, output_dir: Path, data: Path, max_iterations: int, *opts: str) -> list[str]:
    return [
        "--config-file", str(TINY_CONFIG), "--output-dir", str(output_dir), "--partition", cluster.partition,
        "--ngpus", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--timeout", "10",
        f"train.dataset_path={data}", f"train.max_iterations={max_iterations}", "train.batch_size_per_gpu=4",
        "train.log_period_iterations=1", "evaluation.eval_period_iterations=1000",
        *opts,
    ]  # fmt: skip


def _logged_iterations(output_dir: Path) -> list[int]:
    path = output_dir / "training_metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()]


def _checkpoint_iterations(output_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (output_dir / "checkpoints").glob("model_*.pth"))


def test_two_task_cpu_job_trains_and_leaves_checkpoints_and_logs(slurm_cluster, cells, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(slurm_cluster, out, cells, 4, "train.checkpoint_period_iterations=2", "train.num_workers=0")
    assert submit_train_main(argv) == 0  # the console script dinov2-submit-train
    printed = capsys.readouterr().out
    job_id = printed.split("Submitted job ")[1].split()[0]
    assert f"{out / 'checkpoints'}" in printed and f"{out / job_id}" in printed
    job = submitit.SlurmJob(folder=out / "%j", job_id=job_id, tasks=(0, 1))
    slurm_cluster.wait_for_job(job, timeout=180)
    results = job.results()
    assert [(r.status, r.iteration) for r in results] == [("completed", 4), ("completed", 4)]
    assert _checkpoint_iterations(out) == [2, 4]
    ckpt = torch.load(out / "checkpoints" / "model_0000004.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 4
    assert _logged_iterations(out)[-1] in (3, 4)
    assert (out / "config.yaml").exists()
    # submitit's per-task logs, both ranks, in OUTPUT_DIR/<job id>/
    for rank in (0, 1):
        log = (out / job_id / f"{job_id}_{rank}_log.out").read_text()
        assert f"SLURM task rank {rank}/2" in log and "Job completed successfully" in log


def test_interrupted_training_requeues_and_resumes_from_its_checkpoint(slurm_cluster, cells, tmp_path):
    out = tmp_path / "run"
    # An idle machine runs ~10 tiny iterations a second, so the run must be long enough that the
    # interrupt (sent as soon as 2 iterations are logged) always lands before the run could finish.
    total = 64
    args = get_parser().parse_args(
        _argv(slurm_cluster, out, cells, total, "train.checkpoint_period_iterations=1000")
    )
    job = submit_jobs(TrainTask, args, "dinov2:train")
    slurm_cluster.wait_until(
        lambda: len(_logged_iterations(out)) >= 2, 120, "the first training iterations", poll=0.1
    )
    job._interrupt()  # submitit's preemption simulation: SIGTERM, then SIGUSR2
    assert len(_logged_iterations(out)) < total, "the run finished before the interrupt: raise `total`"
    slurm_cluster.wait_until(
        lambda: slurm_cluster.job_field(job.job_id, "Restarts") == "1", 90, "the requeue"
    )
    slurm_cluster.wait_for_job(job, timeout=240)
    assert [(r.status, r.iteration) for r in job.results()] == [("completed", total)] * 2

    # The preempted run saved a checkpoint at the step it stopped at (no periodic one is due before
    # iteration 1000); the requeued run resumed from it and finished.
    ckpts = _checkpoint_iterations(out)
    assert len(ckpts) == 2 and ckpts[-1] == total and 2 <= ckpts[0] < total, ckpts
    stopped = ckpts[0]
    # Every iteration was trained (and logged) exactly once: nothing restarted from zero.
    assert _logged_iterations(out) == list(range(1, total + 1))
    train_log = (out / "training_log.txt").read_text()
    assert f"preempted at iteration {stopped}" in train_log
    assert f"model_{stopped:07d}.pth (iteration {stopped})" in train_log
    log0 = (out / job.job_id / f"{job.job_id}_0_log.out").read_text()
    assert f"Requeued job {job.job_id}" in log0 and "restart 1" in log0
