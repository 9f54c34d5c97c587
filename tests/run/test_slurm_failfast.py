"""A training job whose rank fails ends as FAILED at once on the local SLURM cluster, and is not requeued.

Rank 1 raises at iteration 3 while rank 0 hangs in that step (as a rank stuck in a NCCL collective
would: it never notices the abort). Only the launcher's `srun --kill-on-bad-exit=1` can end rank 0,
so the job ends within a minute of the failure instead of at its 10-minute time limit.
"""

import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from dinov2.run.submit import submit_jobs
from dinov2.run.train.train import TrainTask, get_parser

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The job unpickles this module's task class; it cannot import the test module, so ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "dinov2" / "configs" / "train" / "vit_tiny_cpu.yaml"
FAULT_ITERATION = 3


class FailingTrainTask(TrainTask):
    """Real training with a fault: rank 1 raises at FAULT_ITERATION, rank 0 hangs there."""

    def run(self):
        import os

        import dinov2.train.train as train_module

        real = train_module.train_step
        marker = Path(self.args.output_dir) / "fault_time.txt"

        def step(model, optimizer, scaler, averager, data, schedules, it, cfg):
            if it == FAULT_ITERATION:
                if os.environ["RANK"] == "1":
                    marker.write_text(f"{time.time():.3f}")
                    raise RuntimeError(f"injected fault: rank 1 failed at iteration {it}")
                time.sleep(600)  # stuck: only the launcher can end this rank
            return real(model, optimizer, scaler, averager, data, schedules, it, cfg)

        train_module.train_step = step
        return super().run()


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    from dinov2.data.synthetic import generate_synthetic_cells

    return Path(
        generate_synthetic_cells(tmp_path_factory.mktemp("cells"), per_class=3, size=64, progress=False)
    )


def test_job_whose_rank_raises_ends_failed_within_a_minute(slurm_cluster, cells, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--config-file", str(TINY_CONFIG), "--output-dir", str(out), "--partition", slurm_cluster.partition,
        "--ngpus", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--timeout", "10",
        f"train.dataset_path={cells}", "train.max_iterations=50", "train.batch_size_per_gpu=4",
        "train.log_period_iterations=1", "evaluation.eval_period_iterations=1000",
    ]  # fmt: skip
    job = submit_jobs(FailingTrainTask, get_parser().parse_args(argv), "test:failfast")
    marker = out / "fault_time.txt"
    slurm_cluster.wait_until(marker.is_file, 180, "the injected fault")

    def ended() -> str:
        # scontrol, not submitit: submitit polls a multi-task job's state only every ~minute.
        state = slurm_cluster.job_field(job.job_id, "JobState")
        return "" if state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED") else state

    try:
        state = slurm_cluster.wait_until(ended, 120, "the end of the job", poll=0.2)
    finally:
        slurm_cluster.run("scancel", job.job_id)  # no-op once it ended; never left running
    assert time.time() - float(marker.read_text()) < 60
    assert state == "FAILED"
    assert slurm_cluster.job_field(job.job_id, "Restarts") == "0"  # a failure is not requeued
    log1 = "".join((out / job.job_id / f"{job.job_id}_1_log.{ext}").read_text() for ext in ("out", "err"))
    assert "Traceback" in log1 and f"injected fault: rank 1 failed at iteration {FAULT_ITERATION}" in log1
    log0 = (out / job.job_id / f"{job.job_id}_0_log.out").read_text()
    assert "Requeued" not in log0
