"""Launcher options, sbatch rendering, task environment and clear errors (no cluster needed)."""

import argparse
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinov2.run.job_env import PORT_BASE, PORT_SPAN, distributed_environment, master_port
from dinov2.run.submit import (
    DEFAULT_TIMEOUT_MIN,
    SubmissionError,
    Task,
    check_output_dir,
    check_slurm_available,
    get_args_parser,
    launch,
    render_sbatch_script,
    sbatch_parameters,
    submit_jobs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _entry_parser() -> argparse.ArgumentParser:
    """Stands for an entry point's parser (like training's): a config file and key=value options."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config-file", default="")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    return p


def _parse(*argv: str) -> argparse.Namespace:
    return get_args_parser(parents=[_entry_parser()]).parse_args(list(argv))


def test_parser_defaults_and_all_options():
    args = _parse("--output-dir", "/o")
    assert (args.ngpus, args.nodes, args.timeout, args.partition, args.dry_run) == (
        8,
        1,
        DEFAULT_TIMEOUT_MIN,
        None,
        False,
    )
    args = _parse(
        "--config-file", "c.yaml", "--output-dir", "/o", "--partition", "hard", "--ngpus", "2",
        "--nodes", "3", "--timeout", "90", "--account", "acc", "--qos", "high", "--comment", "cells",
        "--exclude", "n[1-2]", "--constraint", "a100", "--cpus-per-task", "6", "--mem", "200G",
        "--dry-run", "optim.epochs=3", "train.batch_size_per_gpu=4",
    )  # fmt: skip
    assert args.config_file == "c.yaml" and args.output_dir == "/o"
    assert (args.partition, args.ngpus, args.nodes, args.timeout) == ("hard", 2, 3, 90)
    assert (args.account, args.qos, args.comment, args.exclude, args.constraint) == (
        "acc", "high", "cells", "n[1-2]", "a100",
    )  # fmt: skip
    assert (args.cpus_per_task, args.mem, args.dry_run) == (6, "200G", True)
    assert args.opts == ["optim.epochs=3", "train.batch_size_per_gpu=4"]


@pytest.mark.parametrize(
    "option,value,message",
    [("--ngpus", "-1", "integer >= 0"), ("--nodes", "0", "positive integer"), ("--timeout", "ten", "'ten'")],
)
def test_bad_numbers_are_usage_errors(option, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parse("--output-dir", "/o", option, value)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_output_dir_added_only_when_parent_lacks_it():
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--output-dir", default="from-parent")
    args = get_args_parser(parents=[parent]).parse_args([])
    assert args.output_dir == "from-parent"
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([])  # required when the entry point does not define it


def test_gpu_job_parameters():
    params = sbatch_parameters(
        _parse("--output-dir", "/o", "--ngpus", "2", "--nodes", "3", "--timeout", "90"), "x"
    )
    # one task per GPU; GPU tasks get 10 CPUs and 40 GB per GPU unless told otherwise
    assert params["ntasks_per_node"] == 2 and params["gpus_per_node"] == 2 and params["nodes"] == 3
    assert params["cpus_per_task"] == 10 and params["mem"] == "80G" and params["time"] == 90
    assert params["job_name"] == "x" and "partition" not in params


def test_cpu_job_parameters():
    args = _parse("--output-dir", "/o", "--ngpus", "0", "--ntasks-per-node", "3", "--mem", "4G")
    params = sbatch_parameters(args, "x")
    assert params["ntasks_per_node"] == 3 and "gpus_per_node" not in params
    assert params["cpus_per_task"] == 1 and params["mem"] == "4G"


def test_dry_run_script_holds_the_requested_resources(tmp_path, capsys):
    out = tmp_path / "never-created"
    args = _parse(
        "--output-dir", str(out), "--partition", "hard", "--ngpus", "2", "--nodes", "3", "--timeout", "90",
        "--account", "acc", "--qos", "high", "--exclude", "n1", "--constraint", "a100", "--dry-run",
    )  # fmt: skip
    assert launch(get_args_parser(parents=[_entry_parser()]), Task, "dinov2:test", _argv_of(args)) == 0
    script = capsys.readouterr().out
    lines = set(script.splitlines())
    for expected in [
        "#SBATCH --partition=hard",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --nodes=3",
        "#SBATCH --time=90",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=80G",
        "#SBATCH --account=acc",
        "#SBATCH --qos=high",
        "#SBATCH --exclude=n1",
        "#SBATCH --constraint=a100",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=dinov2:test",
        f"#SBATCH --output={out}/%j/%j_0_log.out",
    ]:
        assert expected in lines, f"{expected!r} missing from:\n{script}"
    assert script.startswith("#!/bin/bash")
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0] and f"{out}/%j" in srun[0]
    # one task failing ends the whole job at once (fail fast), instead of leaving the others waiting
    assert "--kill-on-bad-exit=1" in srun[0].split()
    assert "export PYTHONPATH=" in script and str(REPO_ROOT) in script
    assert not out.exists()  # a dry run writes nothing


def _argv_of(args: argparse.Namespace) -> list[str]:
    argv = ["--output-dir", args.output_dir, "--ngpus", str(args.ngpus), "--nodes", str(args.nodes)]
    argv += ["--timeout", str(args.timeout)]
    for name in ("partition", "account", "qos", "exclude", "constraint"):
        if getattr(args, name):
            argv += [f"--{name}", getattr(args, name)]
    return argv + (["--dry-run"] if args.dry_run else [])


def test_render_matches_submitit_folder_layout(tmp_path):
    params = sbatch_parameters(_parse("--output-dir", str(tmp_path), "--ngpus", "0"), "n")
    text = render_sbatch_script(params, tmp_path)
    assert f"#SBATCH --error={tmp_path}/%j/%j_0_log.err" in text
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=1" in text


def test_launcher_script_dry_run_from_any_directory(tmp_path):
    # The command users type, run as a file from another directory without installing the package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [
        sys.executable, str(REPO_ROOT / "dinov2/run/train/train.py"),
        "--config-file", str(REPO_ROOT / "dinov2/configs/train/vitl_cellsim_register.yaml"),
        "--output-dir", str(tmp_path / "run"), "--partition", "hard", "--ngpus", "2", "--dry-run",
        "train.dataset_path=/data/cells",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "#SBATCH --partition=hard" in lines and "#SBATCH --gpus-per-node=2" in lines
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --nodes=1" in lines
    assert f"#SBATCH --time={DEFAULT_TIMEOUT_MIN}" in lines


def test_no_slurm_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun/sinfo here
    with pytest.raises(SubmissionError, match="SLURM is not available.*sbatch"):
        check_slurm_available()
    parser = get_args_parser(parents=[_entry_parser()])
    code = launch(parser, Task, "dinov2:test", ["--output-dir", str(tmp_path / "o"), "--ngpus", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "error: SLURM is not available" in err and "Traceback" not in err


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SubmissionError, match=r"output directory '.*a-file/run' is not writable"):
        check_output_dir(blocker / "run")
    if os.geteuid() != 0:  # permission bits do not stop root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(SubmissionError, match="not writable"):
            check_output_dir(ro)
    ok = check_output_dir(tmp_path / "new" / "run")
    assert ok.is_dir() and list(ok.iterdir()) == []  # the write test leaves nothing behind


def test_master_port_is_shared_by_tasks_and_moves_on_restart():
    ports = {master_port("4242", r) for r in range(5)}
    assert len(ports) == 5  # a restarted job does not reuse the previous run's port
    assert master_port("4242", 1) == master_port("4242", 1)
    assert all(
        PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports | {master_port(str(i)) for i in range(200)}
    )


def test_master_port_stays_below_the_ephemeral_range_for_any_job_id():
    # Linux hands out 32768-60999 as source ports; the rendezvous port must never fall there.
    ports = {master_port(str(job), r) for job in range(0, 2_000_000, 997) for r in range(3)}
    ports |= {master_port(f"{job}_{task}") for job in (5, 123456) for task in range(50)}  # array jobs
    assert 1024 < min(ports) and max(ports) < 32768
    assert len(ports) > 3000  # spread over the range, not a handful of values
    # the documented rule, computed by hand for one job id
    assert master_port("123456", 1) == 10000 + zlib.crc32(b"123456:1") % 20000


def test_dry_run_shows_the_nccl_defaults_and_the_port_rule(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.delenv("NCCL_DEBUG", raising=False)
    monkeypatch.delenv("NCCL_IB_HCA", raising=False)
    parser = get_args_parser(parents=[])
    args = parser.parse_args(["--output-dir", str(tmp_path), "--dry-run"])
    assert submit_jobs(Task, args, "test:nccl") is None
    out, err = capsys.readouterr()
    # defaults that keep a value the user exported (sbatch passes the environment to the job)
    assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in out.splitlines()
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in out.splitlines()
    assert "MASTER_PORT = 10000 + crc32('<job id>:<restart count>') % 20000" in out
    assert "# NCCL_SOCKET_IFNAME=ib0 (from this environment)" in err.splitlines()
    assert "# NCCL_DEBUG=WARN (script default)" in err.splitlines()
    assert "# NCCL_IB_HCA unset (NCCL's default)" in err.splitlines()
    assert "in [10000, 30000)" in err


def test_distributed_environment_from_job(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: fall back to the parsed node list
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    job_env = SimpleNamespace(
        num_tasks=8, num_nodes=2, global_rank=5, local_rank=1, hostnames=["localhost", "other"],
        hostname="other", raw_job_id="77",
    )  # fmt: skip
    env = distributed_environment(job_env)
    assert env == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": str(master_port("77", 2)),
    }


def test_task_checkpoint_resubmits_a_fresh_task_with_the_same_args():
    class Probe(Task):
        def run(self):
            return self.args.value

    task = Probe(argparse.Namespace(value=3))
    delayed = task.checkpoint()
    assert type(delayed.function) is Probe and delayed.function is not task
    assert delayed.function.args is task.args and delayed.args == () and delayed.kwargs == {}
    with pytest.raises(NotImplementedError, match="Task must implement run"):
        Task(argparse.Namespace()).run()


def test_entry_point_validation_runs_before_anything_is_submitted(tmp_path, capsys):
    seen = []

    class Strict(Task):
        @classmethod
        def validate(cls, args, dry_run):
            seen.append(dry_run)
            if args.opts:
                raise ValueError(f"unknown key {args.opts[0].split('=')[0]!r}")

    parser = get_args_parser(parents=[_entry_parser()])
    argv = ["--output-dir", str(tmp_path / "o"), "--dry-run", "optim.epoch=3"]
    assert launch(parser, Strict, "dinov2:strict", argv) == 2
    captured = capsys.readouterr()
    assert "error: invalid arguments for dinov2:strict: unknown key 'optim.epoch'" in captured.err
    assert captured.out == "" and seen == [True]  # no script printed for invalid arguments


def test_stop_signal_comes_before_the_time_limit():
    # 120 s of warning for a normal job; a 1-minute job gets it half-way, not at its start
    assert sbatch_parameters(_parse("--output-dir", "/o", "--timeout", "90"), "x")["signal_delay_s"] == 120
    assert sbatch_parameters(_parse("--output-dir", "/o", "--timeout", "1"), "x")["signal_delay_s"] == 30


def test_interrupted_entry_point_ends_the_task_with_130_without_requeue(monkeypatch, capsys):
    class Interrupted(Task):
        graceful_preemption = True

        def run(self):
            return SimpleNamespace(status="interrupted", iteration=4)

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # restored after the test
    monkeypatch.setattr("dinov2.run.submit.distributed_environment", lambda: env)
    with pytest.raises(SystemExit) as caught:
        Interrupted(argparse.Namespace())()
    assert caught.value.code == 130
    assert "not requeuing" in capsys.readouterr().out
