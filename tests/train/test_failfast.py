"""A failing training run fails fast (dinov2/train/train.py, issue 17): faults injected into real runs.

Each test runs the training CLI in a subprocess through tests/train/fault_injection.py, which
monkeypatches one thing (a step that raises, a NaN loss, a DataLoader worker that raises or is
killed, SIGINTs, a torch.save that hits a full disk) and prints when the fault fires. The tests
check the exit status, the time from the fault to the exit, what is on disk, and that no process of
the job (rank, DataLoader worker) is left behind, by PID.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.train import checkpointing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
INJECT = str(REPO_ROOT / "tests" / "train" / "fault_injection.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# A few iterations of a very small model, with the tiny config's 2 DataLoader workers.
SMALL = [
    "student.depth=2",
    "train.batch_size_per_gpu=4",
    "crops.local_crops_number=2",
    "train.num_workers=2",
    "train.OFFICIAL_EPOCH_LENGTH=10",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "train.log_period_iterations=1",
    "train.checkpoint_period_iterations=2",
    "train.collapse_check_period_iterations=0",
    "evaluation.eval_period_iterations=0",
    "dino.head_n_prototypes=64",
    "ibot.head_n_prototypes=64",
]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return generate_synthetic_cells(tmp_path_factory.mktemp("cells"), per_class=4, size=64, progress=False)


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/pid/stat), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class Job:
    """A training command in a subprocess, with every process it ever spawned (PID, start time)."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.seen: dict[int, str] = {}
        self.output = ""
        self.ended_at: float | None = None

    def _collect(self) -> None:
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                started = _start_time(child)
                if started is not None:
                    self.seen.setdefault(child, started)
                    todo.append(child)

    def poll_until(self, predicate, timeout: float) -> bool:
        """Collect processes until `predicate()` is true (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._collect()
            if predicate():
                return True
            time.sleep(0.1)
        return False

    def wait(self, timeout: float) -> int:
        """The exit status; kills the whole tree and fails the test when it outlives `timeout`."""
        self._collect()
        if not self.poll_until(lambda: self.proc.poll() is not None, timeout):
            self.kill_all()
            self.output = self.proc.communicate()[0]
            pytest.fail(f"still running after {timeout:.0f} s; output:\n{self.output[-4000:]}")
        self.ended_at = time.time()
        self.output = self.proc.communicate()[0]
        return self.proc.returncode

    def survivors(self, grace: float = 5.0) -> list[int]:
        """Processes of the job still alive `grace` seconds after it ended (same PID and start time)."""
        deadline = time.monotonic() + grace
        while True:
            alive = [pid for pid, started in self.seen.items() if _start_time(pid) == started]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def kill_all(self) -> None:
        for pid in [self.proc.pid, *self.seen]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def fault_times(self) -> list[float]:
        """Wall-clock times at which injected faults fired, in order."""
        return [
            float(t) for t in re.findall(r"^fault-injection: .* at ([0-9.]+)$", self.output, re.MULTILINE)
        ]

    def seconds_after_fault(self, which: int = 0) -> float:
        times = self.fault_times()
        assert times, f"the fault never fired; output:\n{self.output[-4000:]}"
        return self.ended_at - times[which]


def _train_cmd(launcher: list[str], faults: list[str], out: Path, data: Path, *extra: str) -> list[str]:
    return [*launcher, INJECT, *faults, "--", "--config-file", "train/vit_tiny_cpu", "--output-dir", str(out),
            f"train.dataset_path={data}", *SMALL, *extra]  # fmt: skip


def _one_process(faults: list[str], out: Path, data: Path, *extra: str) -> Job:
    return Job(_train_cmd([sys.executable], faults, out, data, *extra))


def _assert_nothing_left(job: Job) -> None:
    alive = job.survivors()
    if alive:
        job.kill_all()
    assert not alive, f"processes of the job still alive after it ended: {alive}"


def test_exception_in_a_step_with_two_workers_exits_within_15_s(cells, tmp_path):
    job = _one_process(["raise-in-step:3"], tmp_path / "run", cells)
    assert job.wait(timeout=120) == 1, job.output[-4000:]
    assert job.seconds_after_fault() < 15
    assert "Traceback" in job.output and "injected fault: train_step raised at iteration 3" in job.output
    assert len(job.seen) >= 2, "the two DataLoader workers were never seen"
    _assert_nothing_left(job)


def test_non_finite_loss_saves_the_last_finite_state_and_exits_at_once(cells, tmp_path):
    out = tmp_path / "run"
    job = _one_process(["nan-loss:3"], out, cells)
    assert job.wait(timeout=120) == 1, job.output[-4000:]
    assert job.seconds_after_fault() < 15
    saved = out / "checkpoints" / "model_0000003.pth"
    assert "non-finite loss at iteration 3: dino_global_crops_loss=nan" in job.output
    assert f"was saved to {saved}" in job.output
    assert torch.load(saved, map_location="cpu", weights_only=True)["iteration"] == 3
    _assert_nothing_left(job)


@pytest.mark.parametrize(
    "fault,message",
    [
        ("raise-in-worker:13", "Caught RuntimeError in DataLoader worker process"),
        # torch reports the death from its SIGCHLD handler, or as the worker having "exited unexpectedly"
        # with the kill as the cause, depending on where the main process is waiting.
        (
            "kill-worker:13",
            r"DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal|exited unexpectedly)",
        ),
    ],
)
def test_a_failing_dataloader_worker_fails_the_run_naming_the_worker(cells, tmp_path, fault, message):
    # Stream position 13 is the second image of iteration 3 (4 images per iteration).
    job = _one_process([fault], tmp_path / "run", cells)
    assert job.wait(timeout=120) == 1, job.output[-4000:]
    assert job.seconds_after_fault() < 15
    assert re.search(f"training failed on rank 0: RuntimeError: {message}", job.output), job.output[-4000:]
    if fault.startswith("kill"):
        assert re.search(r"DataLoader worker \(pid \d+\) is killed by signal: Killed", job.output)
    _assert_nothing_left(job)


def test_first_sigint_finishes_the_step_saves_and_exits_130(cells, tmp_path):
    out = tmp_path / "run"
    job = _one_process(["sigint-in-step:3:1"], out, cells, "train.checkpoint_period_iterations=100")
    assert job.wait(timeout=120) == 130, job.output[-4000:]
    assert job.seconds_after_fault() < 15
    # The step in flight (iteration index 3) finished, then its state was saved: 4 iterations done.
    assert [it for it, _ in checkpointing.list_checkpoints(out / "checkpoints")] == [4]
    state = torch.load(out / "checkpoints" / "model_0000004.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 4 and state["sampler"]["position"] == 16
    assert "interrupted at iteration 4: checkpoint saved" in job.output
    _assert_nothing_left(job)


def test_second_sigint_exits_at_once(cells, tmp_path):
    out = tmp_path / "run"
    # Both SIGINTs arrive within iteration 3, 0.5 s apart; the step would then sleep another 0.5 s.
    job = _one_process(["sigint-in-step:3:2"], out, cells, "train.checkpoint_period_iterations=100")
    status = job.wait(timeout=120)
    assert status == -signal.SIGINT, job.output[-4000:]  # killed by SIGINT: a shell reports 130
    assert len(job.fault_times()) == 2 and job.seconds_after_fault(which=1) < 5
    assert checkpointing.list_checkpoints(out / "checkpoints") == []  # no checkpoint was written
    _assert_nothing_left(job)  # the workers died with the process


def test_disk_full_while_saving_keeps_the_previous_checkpoint(cells, tmp_path):
    out = tmp_path / "run"
    job = _one_process(["enospc-on-save:4"], out, cells)
    assert job.wait(timeout=120) == 1, job.output[-4000:]
    assert job.seconds_after_fault() < 15
    failed = out / "checkpoints" / "model_0000004.pth"
    previous = out / "checkpoints" / "model_0000002.pth"
    assert f"No space left on device: '{failed}'" in job.output
    assert f"the previous checkpoint {previous} is intact" in job.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["model_0000002.pth"]  # no temp file
    state = torch.load(previous, map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and "student.backbone.cls_token" in state["model"]
    _assert_nothing_left(job)


def test_failure_on_one_torchrun_rank_ends_the_whole_job(cells, tmp_path):
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node=2"]
    job = Job(_train_cmd(launcher, ["raise-in-step:3:1"], tmp_path / "run", cells))
    assert job.wait(timeout=180) != 0, job.output[-4000:]
    assert job.seconds_after_fault() < 60
    assert "injected fault: train_step raised at iteration 3 on rank 1" in job.output
    assert len(job.seen) >= 6, f"expected 2 ranks with 2 workers each, saw {sorted(job.seen)}"
    _assert_nothing_left(job)


def test_killing_torchrun_leaves_no_rank_or_worker_behind(cells, tmp_path):
    out = tmp_path / "run"
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, "dinov2/train/train.py", "--config-file", "train/vit_tiny_cpu", "--output-dir",
           str(out), f"train.dataset_path={cells}", *SMALL, "train.OFFICIAL_EPOCH_LENGTH=1000"]  # fmt: skip
    job = Job(cmd)
    metrics = out / "training_metrics.jsonl"

    def training() -> bool:
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 2 and len(job.seen) >= 6

    if not job.poll_until(lambda: training() or job.proc.poll() is not None, timeout=180) or not training():
        job.kill_all()
        pytest.fail(f"training did not start; output:\n{job.proc.communicate()[0][-4000:]}")
    job.proc.kill()  # SIGKILL: torchrun cannot forward anything to its ranks
    job.wait(timeout=30)
    _assert_nothing_left(job)
