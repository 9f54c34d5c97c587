"""A job requeued from outside (`scontrol requeue`) stops gracefully and resumes, on a real cluster.

A small stand-in trainer follows the training contract (resume from the newest checkpoint in
<output_dir>/checkpoints, stop at a step boundary when PreemptionFlag.should_stop() says so, save,
return status "preempted") and carries a state that must continue exactly across the restart, so
this checks the launcher's SIGTERM path on its own; tests/run/test_slurm_train.py checks the
submitit preemption path (SIGTERM + SIGUSR2, requeue by the job itself) with the real training.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest

from dinov2.run.submit import Task, get_args_parser, submit_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The job unpickles this module's classes; it cannot import the test module, so ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class StandInResult:
    status: str
    iteration: int


def stand_in_train(output_dir: str, total_iterations: int, step_s: float) -> StandInResult:
    """A minimal trainer honouring the training contract (gloo, 1 all_reduce per step)."""
    import torch
    import torch.distributed as dist

    from dinov2.train.preemption import PreemptionFlag

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckpt_dir = Path(output_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    saved = sorted(ckpt_dir.glob("model_*.json"))
    start = json.loads(saved[-1].read_text())["iteration"] if saved else 0
    state = torch.tensor([float(start)])
    flag = PreemptionFlag()
    try:
        for it in range(start, total_iterations):
            if flag.should_stop():
                if rank == 0:
                    (ckpt_dir / f"model_{it:07d}.json").write_text(json.dumps({"iteration": it}))
                dist.barrier()
                return StandInResult("preempted", it)
            time.sleep(step_s)
            step = torch.ones(1)
            dist.all_reduce(step)  # both ranks did this step
            state += step / dist.get_world_size()
            if rank == 0:
                with open(Path(output_dir) / "training_metrics.jsonl", "a") as f:
                    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
                    f.write(json.dumps({"iteration": it, "state": state.item(), "restart": restart}) + "\n")
        if rank == 0:
            (ckpt_dir / f"model_{total_iterations:07d}.json").write_text(
                json.dumps({"iteration": total_iterations})
            )
        return StandInResult("completed", total_iterations)
    finally:
        flag.uninstall()
        dist.destroy_process_group()


class StandInTask(Task):
    graceful_preemption = True

    def run(self):
        return stand_in_train(self.args.output_dir, self.args.total_iterations, self.args.step_s)


def _launcher_args(
    cluster, output_dir: Path, total_iterations: int, step_s: float = 0.3
) -> argparse.Namespace:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--total-iterations", type=int)
    extra.add_argument("--step-s", type=float)
    parser = get_args_parser(parents=[extra])
    return parser.parse_args(
        [
            "--output-dir", str(output_dir), "--partition", cluster.partition, "--ngpus", "0",
            "--ntasks-per-node", "2", "--cpus-per-task", "1", "--timeout", "10",
            "--total-iterations", str(total_iterations), "--step-s", str(step_s),
        ]
    )  # fmt: skip


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "training_metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_resumed(output_dir: Path, total: int, stopped_at: int) -> None:
    rows = _metrics(output_dir)
    iterations = [r["iteration"] for r in rows]
    # every iteration ran exactly once, in order: the second run continued where the first stopped
    assert iterations == list(range(total)), iterations
    assert {r["restart"] for r in rows if r["iteration"] < stopped_at} == {0}
    assert {r["restart"] for r in rows if r["iteration"] >= stopped_at} == {1}
    # the state was restored from the checkpoint: it grows by one per iteration across the restart
    assert [r["state"] for r in rows] == [float(i + 1) for i in range(total)]


def _stopped_at(output_dir: Path, total: int) -> int:
    ckpts = sorted(int(p.stem.split("_")[1]) for p in (output_dir / "checkpoints").glob("model_*.json"))
    assert ckpts[-1] == total and len(ckpts) == 2, ckpts
    return ckpts[0]


def test_job_requeued_from_outside_resumes(slurm_cluster, tmp_path):
    total = 14
    args = _launcher_args(slurm_cluster, tmp_path / "out", total)
    job = submit_jobs(StandInTask, args, "test:external-requeue")
    slurm_cluster.wait_until(lambda: len(_metrics(tmp_path / "out")) >= 3, 60, "the first iterations")
    proc = slurm_cluster.run("scontrol", "requeue", job.job_id)
    assert proc.returncode == 0, proc.stderr
    slurm_cluster.wait_for_job(job, timeout=120)
    assert slurm_cluster.job_field(job.job_id, "Restarts") == "1"
    assert [r.status for r in job.results()] == ["completed"] * 2
    stopped_at = _stopped_at(tmp_path / "out", total)
    _check_resumed(tmp_path / "out", total, stopped_at)
    log0 = (tmp_path / "out" / job.job_id / f"{job.job_id}_0_log.out").read_text()
    assert "SIGTERM" in log0  # SLURM's SIGTERM stopped the loop gracefully; SLURM reran the job
