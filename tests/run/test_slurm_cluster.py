"""The launcher against a real single-node SLURM cluster: environment, script, clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from dinov2.run.job_env import master_port
from dinov2.run.submit import SubmissionError, Task, get_args_parser, launch, submit_jobs

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm_local_cluster.sh"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EnvProbeTask(Task):
    """Reports what a task sees: the torch.distributed variables and the job's shell setup."""

    def run(self):
        import socket

        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: os.environ[k] for k in keys}
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
        env["master_resolves"] = bool(socket.getaddrinfo(env["MASTER_ADDR"], None))
        return env


def _argv(cluster, output_dir, *extra: str) -> list[str]:
    return ["--output-dir", str(output_dir), "--partition", cluster.partition, "--ngpus", "0",
            "--ntasks-per-node", "2", "--cpus-per-task", "1", "--timeout", "5", *extra]  # fmt: skip


def test_two_task_job_gets_torchrun_environment_and_the_dry_run_script(slurm_cluster, tmp_path, capsys):
    parser = get_args_parser()
    assert launch(parser, EnvProbeTask, "test:env", _argv(slurm_cluster, tmp_path / "out", "--dry-run")) == 0
    dry_run_script = capsys.readouterr().out
    job = submit_jobs(EnvProbeTask, parser.parse_args(_argv(slurm_cluster, tmp_path / "out")), "test:env")
    printed = capsys.readouterr().out
    assert f"Submitted job {job.job_id}" in printed and str(tmp_path / "out" / job.job_id) in printed
    slurm_cluster.wait_for_job(job, timeout=90)
    # what was submitted is exactly what --dry-run showed
    assert job.paths.submission_file.read_text() == dry_run_script
    results = job.results()
    assert [r["RANK"] for r in results] == ["0", "1"] and [r["LOCAL_RANK"] for r in results] == ["0", "1"]
    port = str(master_port(job.job_id, 0))
    for r in results:
        assert (r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["MASTER_PORT"]) == ("2", "2", port)
        assert r["MASTER_ADDR"] == results[0]["MASTER_ADDR"] and r["master_resolves"]
        assert r["OMP_NUM_THREADS"] == "1" and str(REPO_ROOT) in r["PYTHONPATH"].split(":")
    assert (tmp_path / "out" / job.job_id / f"{job.job_id}_1_log.out").exists()


def test_missing_partition_is_a_clear_error(slurm_cluster, tmp_path, capsys):
    argv = _argv(slurm_cluster, tmp_path / "out")
    argv[argv.index("--partition") + 1] = "hard"
    assert launch(get_args_parser(), EnvProbeTask, "test:partition", argv) == 2
    err = capsys.readouterr().err
    assert "error: partition 'hard' does not exist on this cluster; available partitions: debug" in err
    assert "Traceback" not in err


def test_unwritable_output_dir_is_a_clear_error(slurm_cluster, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert (
        launch(get_args_parser(), EnvProbeTask, "test:dir", _argv(slurm_cluster, tmp_path / "file" / "o"))
        == 2
    )
    err = capsys.readouterr().err
    assert f"error: output directory '{tmp_path / 'file' / 'o'}' is not writable" in err


def test_job_sbatch_refuses_is_a_clear_error_and_leaves_nothing(slurm_cluster, tmp_path):
    args = get_args_parser().parse_args(_argv(slurm_cluster, tmp_path / "out"))
    args.ngpus = 1  # this cluster has no GPUs
    with pytest.raises(SubmissionError, match="sbatch refused the job: .*"):
        submit_jobs(EnvProbeTask, args, "test:gpu")
    assert list((tmp_path / "out").iterdir()) == []


def test_cluster_script_status_and_usage(slurm_cluster):
    env = slurm_cluster.env
    status = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, env=env)
    assert status.returncode == 0, status.stderr
    assert "slurmctld: running" in status.stdout and slurm_cluster.partition in status.stdout
    usage = subprocess.run(["bash", str(CLUSTER_SCRIPT), "bogus"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    printed = subprocess.run(["bash", str(CLUSTER_SCRIPT), "env"], capture_output=True, text=True, env=env)
    assert f"export SLURM_CONF={slurm_cluster.state_dir}/etc/slurm.conf" in printed.stdout.splitlines()
