"""Submit dinov2 entry points to SLURM through submitit: one task per GPU, requeued on preemption.

Every launcher (dinov2/run/train/train.py, dinov2/run/eval/*.py) is a few lines on top of this:
a `Task` subclass whose `run()` calls the entry point, and a `main()` that parses the launcher
options (`get_args_parser`) and calls `submit_jobs`.

What a submitted job does:
- sbatch starts `nodes x tasks-per-node` copies of the pickled task (submitit's `srun` line); each
  sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR (first node of the job) and
  MASTER_PORT (from the job id, below Linux's ephemeral ports), exactly what torchrun would set,
  then runs the entry point. The sbatch script defaults NCCL_DEBUG=WARN and
  TORCH_NCCL_ASYNC_ERROR_HANDLING=1; other NCCL variables come from the submitting shell.
- submitit's logs and pickles go to `<output-dir>/<job id>/`; the entry point writes its own
  outputs (training checkpoints in `<output-dir>/checkpoints/`) under `<output-dir>`.
- Before the time limit (SIGUSR2, `--signal=USR2@120`) or on preemption (SIGTERM), a task with
  `graceful_preemption` lets the entry point stop at a step boundary and save a checkpoint
  (dinov2.train.preemption.PreemptionFlag), then rank 0 hands over to submitit's handler, which
  dumps a fresh copy of the task (`checkpoint()`) and requeues the job; the requeued job runs the same
  task, and training resumes from its newest checkpoint. A job requeued from outside
  (`scontrol requeue`) gets SIGTERM, stops the same way and is rerun by SLURM.
- A task that fails exits with a non-zero status (training aborts its process group, so the other
  ranks fail too), and `srun --kill-on-bad-exit=1` ends every other task of the job at once even
  if one is stuck where it cannot notice: the job ends as FAILED instead of holding its nodes until
  the time limit, and is not requeued.

Usage (a launcher):
    class MyTask(Task):
        def run(self):
            from dinov2.some.module import main
            return main(self.args)

    def main(argv=None):
        parser = get_args_parser(description="...", parents=[entry_point_parser(add_help=False)])
        return launch(parser, MyTask, "dinov2:my", argv)
"""

import argparse
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission, FailedJobError

from dinov2.run.job_env import PORT_BASE, PORT_RULE, PORT_SPAN, distributed_environment
from dinov2.utils.distributed import env_rank

logger = logging.getLogger("dinov2")

# How long before the time limit SLURM sends SIGUSR2: time to finish a step and write a checkpoint.
SIGNAL_DELAY_S = 120
DEFAULT_TIMEOUT_MIN = 2800
DEFAULT_CPUS_PER_GPU_TASK = 10
DEFAULT_MEM_GB_PER_GPU = 40
# srun options: one task exiting non-zero ends the whole step (the fail-fast second line of defence).
SRUN_ARGS = ("--kill-on-bad-exit=1",)
# Requeues after a time-out allowed before submitit gives up (preemptions do not count).
MAX_NUM_TIMEOUT = 30
# NCCL / torch variables a multi-node job commonly needs. sbatch passes the submitting shell's
# environment to the job, so `export NCCL_SOCKET_IFNAME=ib0` before submitting reaches every task.
NCCL_ENV_VARS = (
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "NCCL_IB_DISABLE",
    "NCCL_DEBUG",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)
# Defaults the sbatch script sets unless the environment already has a value: NCCL reports only
# problems, and a failed or timed-out collective tears the process down (fail fast, not hang).
NCCL_ENV_DEFAULTS = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


class SubmissionError(ValueError):
    """The job cannot be submitted (no SLURM, unknown partition, unwritable output dir, sbatch error)."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _has_option(parsers: list[argparse.ArgumentParser], option: str) -> bool:
    return any(option in p._option_string_actions for p in parsers)


def get_args_parser(
    description: str | None = None,
    parents: list[argparse.ArgumentParser] | None = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    """Launcher options (SLURM resources) on top of the entry point's own parser(s) in `parents`.

    `parents` provide the entry point's options (e.g. --config-file and trailing key=value `opts`
    for training); --output-dir is added here unless a parent defines it.
    """
    parents = list(parents or [])
    parser = argparse.ArgumentParser(
        description=description, parents=parents, add_help=add_help, allow_abbrev=False
    )
    if not _has_option(parents, "--output-dir"):
        parser.add_argument(
            "--output-dir", required=True, help="where outputs go; submitit logs go to OUTPUT_DIR/<job id>/"
        )
    group = parser.add_argument_group("SLURM")
    group.add_argument("--partition", default=None, help="partition to submit to (default: the cluster's)")
    group.add_argument(
        "--ngpus",
        type=_non_negative_int,
        default=8,
        help="GPUs per node, one task per GPU (default: %(default)s); 0: CPU tasks (see --ntasks-per-node)",
    )
    group.add_argument("--nodes", type=_positive_int, default=1, help="number of nodes (default: 1)")
    group.add_argument(
        "--ntasks-per-node",
        type=_positive_int,
        default=1,
        help="tasks per node when --ngpus 0 (CPU tasks, gloo); ignored otherwise (default: 1)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_int,
        default=DEFAULT_TIMEOUT_MIN,
        help=f"time limit per job in minutes, then it requeues itself (default: {DEFAULT_TIMEOUT_MIN})",
    )
    group.add_argument("--account", default=None, help="SLURM account to charge")
    group.add_argument("--qos", default=None, help="SLURM quality of service")
    group.add_argument("--comment", default=None, help="comment attached to the job")
    group.add_argument("--exclude", default=None, help="nodes not to use, e.g. node[01-04]")
    group.add_argument("--constraint", default=None, help="node features required, e.g. volta32gb")
    group.add_argument(
        "--cpus-per-task",
        type=_positive_int,
        default=None,
        help=f"CPUs per task (default: {DEFAULT_CPUS_PER_GPU_TASK} with GPUs, 1 without)",
    )
    group.add_argument(
        "--mem",
        default=None,
        help=f"memory per node, SLURM syntax such as 200G (default: {DEFAULT_MEM_GB_PER_GPU}G per GPU; "
        "CPU jobs: the cluster's default)",
    )
    group.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script that would be submitted and exit"
    )
    return parser


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
class Task(submitit.helpers.Checkpointable):
    """One SLURM task running an entry point in a torch.distributed job.

    Subclasses implement `run()` (call the entry point with `self.args`). With
    `graceful_preemption = True` the entry point must honour dinov2.train.preemption.PreemptionFlag
    and return an object whose `status` is "preempted" when it stopped early (training does), or
    "interrupted" when SIGINT stopped it (the task then ends with status 130 and is not requeued).

    Args:
        args: the parsed launcher arguments; the entry point reads its own options from them.
    """

    graceful_preemption = False

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def run(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement run() to call its entry point")

    @classmethod
    def validate(cls, args: argparse.Namespace, dry_run: bool) -> None:
        """Check the entry point's arguments before submitting, so mistakes surface now rather
        than in a job log after queueing; raise ValueError/FileNotFoundError with the problem.
        `dry_run`: only check what does not depend on this machine's files."""

    def __call__(self) -> Any:
        env = distributed_environment()
        os.environ.update(env)
        print(
            f"[dinov2] SLURM task rank {env['RANK']}/{env['WORLD_SIZE']} (local {env['LOCAL_RANK']}) on "
            f"{socket.gethostname()}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}, job "
            f"{os.environ.get('SLURM_JOB_ID')} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}",
            flush=True,
        )
        if not self.graceful_preemption:
            # submitit's own handler checkpoints (reruns the task from scratch) and requeues at once.
            return self.run()
        from dinov2.train.preemption import PreemptionFlag

        flag = PreemptionFlag()
        try:
            result = self.run()
            if getattr(result, "status", None) == "interrupted":
                print(f"[dinov2] interrupted ({result}): not requeuing", flush=True)
                raise SystemExit(130)
            if getattr(result, "status", None) != "preempted":
                return result
            self._after_preemption(flag, result)
        finally:
            flag.uninstall()

    def _after_preemption(self, flag: Any, result: Any) -> None:
        """The entry point stopped early and saved: requeue (rank 0) and end without a result."""
        rank = env_rank()
        names = [s.name for s in flag.received]
        print(f"[dinov2] rank {rank} stopped early ({result}); signals: {names or 'none'}", flush=True)
        if not names:
            print("[dinov2] no signal reached this task's flag: not requeuing", flush=True)
        # submitit's SIGUSR2 handler, on rank 0, calls self.checkpoint(), requeues the job and exits;
        # its SIGTERM handler only logs (SLURM itself is cancelling or requeueing the job).
        flag.chain_previous_handler()
        # Leave without a result pickle (that would mark the job finished) and with status 0, so a
        # cluster with KillOnBadExit does not kill rank 0 before it has requeued the job.
        raise SystemExit(0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """A fresh task with the same arguments; it resumes from the entry point's own checkpoints."""
        return DelayedSubmission(type(self)(self.args))


# ----------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------
def sbatch_parameters(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """submitit's SLURM parameters (sbatch option names with '_') for the launcher arguments."""
    ngpus = args.ngpus
    params: dict[str, Any] = {
        "job_name": name,
        "time": args.timeout,
        "nodes": args.nodes,
        "ntasks_per_node": ngpus if ngpus > 0 else args.ntasks_per_node,
        "cpus_per_task": args.cpus_per_task or (DEFAULT_CPUS_PER_GPU_TASK if ngpus > 0 else 1),
        # never more than half the time limit, or a short job would be told to stop as it starts
        "signal_delay_s": min(SIGNAL_DELAY_S, args.timeout * 60 // 2),
        "setup": _setup_lines(),
        "srun_args": list(SRUN_ARGS),
    }
    if ngpus > 0:
        params["gpus_per_node"] = ngpus
    mem = args.mem or (f"{DEFAULT_MEM_GB_PER_GPU * ngpus}G" if ngpus > 0 else None)
    optional = {
        "partition": args.partition,
        "mem": mem,
        "account": args.account,
        "qos": args.qos,
        "comment": args.comment,
        "exclude": args.exclude,
        "constraint": args.constraint,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _setup_lines() -> list[str]:
    """Shell lines run by the sbatch script before srun."""
    import dinov2

    repo_root = Path(dinov2.__file__).resolve().parents[1]
    return [
        # the job imports dinov2 from the same checkout, even when it is not pip-installed
        f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}",
        # one BLAS/OpenMP thread per allocated CPU, as torchrun would, unless the user chose
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
        *(f"export {name}=${{{name}:-{value}}}" for name, value in NCCL_ENV_DEFAULTS.items()),
        f"# each task sets {PORT_RULE}",
    ]


def describe_job_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Lines for --dry-run: the MASTER_PORT rule and the NCCL variables the job would inherit."""
    environ = os.environ if environ is None else environ
    lines = [f"{PORT_RULE}, in [{PORT_BASE}, {PORT_BASE + PORT_SPAN}) (below the ephemeral ports)"]
    for name in NCCL_ENV_VARS:
        if name in environ:
            lines.append(f"{name}={environ[name]} (from this environment)")
        elif name in NCCL_ENV_DEFAULTS:
            lines.append(f"{name}={NCCL_ENV_DEFAULTS[name]} (script default)")
        else:
            lines.append(f"{name} unset (NCCL's default)")
    return lines


def job_folder(output_dir: str | Path) -> Path:
    """submitit's folder pattern: logs and pickles of job N go to <output_dir>/N/."""
    return Path(output_dir).expanduser().absolute() / "%j"


def render_sbatch_script(params: dict[str, Any], output_dir: str | Path) -> str:
    """The sbatch script submitit writes for these parameters (identical to the submitted one)."""
    # submitit has no public renderer; this is the function its SlurmExecutor calls, usable
    # without SLURM installed (the executor itself refuses to start without `srun`).
    from submitit.slurm import slurm as submitit_slurm

    folder = job_folder(output_dir)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, **params)


def check_slurm_available() -> None:
    """Raise SubmissionError unless sbatch/srun exist and the controller answers."""
    missing = [p for p in ("sbatch", "srun", "sinfo") if shutil.which(p) is None]
    if missing:
        raise SubmissionError(
            f"SLURM is not available on this machine: {', '.join(missing)} not found on PATH. Submit from a "
            "SLURM login node, start a local test cluster with scripts/slurm_local_cluster.sh, use --dry-run "
            "to see the sbatch script, or run without SLURM (python -m dinov2.train.train / torchrun)."
        )


def list_partitions() -> tuple[list[str], str | None]:
    """(partition names, default partition) from `sinfo`; SubmissionError when SLURM does not answer."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SubmissionError("SLURM does not answer: `sinfo` timed out after 60 s") from None
    if proc.returncode != 0:
        raise SubmissionError(f"SLURM does not answer: `sinfo` failed: {proc.stderr.strip()}")
    names, default = [], None
    for line in proc.stdout.split():
        name = line.rstrip("*")
        if line.endswith("*"):
            default = name
        if name not in names:
            names.append(name)
    return names, default


def check_partition(partition: str | None) -> None:
    """Raise SubmissionError when `partition` is not one of the cluster's partitions."""
    names, default = list_partitions()
    if partition is None:
        if default is None:
            raise SubmissionError(
                f"this cluster has no default partition: choose one with --partition ({', '.join(names)})"
            )
        return
    if partition not in names:
        raise SubmissionError(
            f"partition {partition!r} does not exist on this cluster; available partitions: "
            f"{', '.join(names) or 'none'}"
        )


def check_output_dir(output_dir: str | Path) -> Path:
    """Create `output_dir` if needed and check that files can be written there; return it absolute."""
    path = Path(output_dir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise SubmissionError(f"output directory {str(path)!r} is not writable: {e.strerror or e}") from None
    return path


def submit_jobs(task_class: type[Task], args: argparse.Namespace, name: str) -> Any:
    """Submit `task_class(args)` to SLURM (or print its sbatch script with --dry-run).

    Returns the submitit Job (None for a dry run). Raises SubmissionError with a message for the
    user when SLURM, the partition or the output directory are not usable, or sbatch refuses the job.
    """
    if not getattr(args, "output_dir", None):
        raise SubmissionError("--output-dir is required: job logs, checkpoints and results are written there")
    params = sbatch_parameters(args, name)
    try:
        task_class.validate(args, dry_run=args.dry_run)
    except (ValueError, FileNotFoundError) as e:
        raise SubmissionError(f"invalid arguments for {name}: {e}") from None
    if args.dry_run:
        print(render_sbatch_script(params, args.output_dir), end="")
        for line in describe_job_environment():
            print(f"# {line}", file=sys.stderr)
        print(f"# dry run: nothing submitted ({task_class.__name__}, {name})", file=sys.stderr)
        return None
    check_slurm_available()
    args.output_dir = str(check_output_dir(args.output_dir))
    config_file = getattr(args, "config_file", None)
    if config_file and Path(config_file).expanduser().exists():
        # absolute, so the job finds it whatever its working directory (packaged names stay as given)
        args.config_file = str(Path(config_file).expanduser().absolute())
    check_partition(args.partition)

    executor = submitit.AutoExecutor(
        folder=job_folder(args.output_dir), cluster="slurm", slurm_max_num_timeout=MAX_NUM_TIMEOUT
    )
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    before = set(Path(args.output_dir).iterdir())
    try:
        job = executor.submit(task_class(args))
    except (subprocess.CalledProcessError, FailedJobError, OSError) as e:
        # submitit leaves its pickle and sbatch file behind when sbatch fails: remove only those
        for path in set(Path(args.output_dir).iterdir()) - before:
            if path.suffix == ".pkl" or path.name.startswith(".submission_file_"):
                path.unlink(missing_ok=True)
        raise SubmissionError(f"sbatch refused the job: {str(e).strip()}") from None

    logs = Path(args.output_dir) / job.job_id
    print(f"Submitted job {job.job_id} ({name}) with {_describe(params)}")
    print(f"  logs:        {logs}/{job.job_id}_<task>_log.out and .err")
    print(f"  checkpoints: {Path(args.output_dir) / 'checkpoints'}")
    print(f"  follow:      squeue -j {job.job_id}; tail -f {job.paths.stdout}")
    return job


def _describe(params: dict[str, Any]) -> str:
    gpus = params.get("gpus_per_node")
    per_node = f"{params['ntasks_per_node']} task(s)" + (f" / {gpus} GPU(s)" if gpus else " (CPU)")
    where = f" on partition {params['partition']}" if "partition" in params else ""
    return f"{params['nodes']} node(s) x {per_node}{where}, time limit {params['time']} min"


def launch(
    parser: argparse.ArgumentParser,
    task_class: type[Task],
    name: str,
    argv: list[str] | None = None,
    forward_unknown: bool = False,
) -> int:
    """Parse `argv` with `parser` and submit; a SubmissionError is printed (no traceback), exit code 2.

    With `forward_unknown`, arguments the parser does not know are kept, in order, in
    `args.entry_argv` for the entry point (whose own parser checks them in `Task.validate`).
    """
    if forward_unknown:
        args, args.entry_argv = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    try:
        submit_jobs(task_class, args, name)
    except SubmissionError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
