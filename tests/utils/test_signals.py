"""Workers that ignore stop signals, and processes that die with their parent (dinov2/utils/signals.py)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dinov2.utils.signals import training_worker_init

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, time
from dinov2.utils.signals import die_with_parent
assert die_with_parent(expected_parent=os.getppid())
print("armed", flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def test_child_is_killed_when_its_parent_is_killed():
    parent_code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True)
        print(child.pid, child.stdout.readline().strip(), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        pid, state = parent.stdout.readline().split()
        child = int(pid)
        assert state == "armed" and _alive(child)
        parent.kill()  # SIGKILL: the parent cannot forward anything
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
    finally:
        parent.kill()


def test_parent_already_gone_kills_at_once():
    # The parent that the caller expected is not this process's parent (it exited and the process
    # was re-parented): the signal is delivered right away.
    code = (
        "import os\nfrom dinov2.utils.signals import die_with_parent\n"
        "die_with_parent(expected_parent=os.getpid())\nprint('alive')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert proc.returncode == -signal.SIGKILL and proc.stdout == ""


def _worker(ready) -> None:
    training_worker_init(0)
    ready.set()
    time.sleep(30)


def test_training_workers_ignore_stop_and_interrupt_signals():
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(timeout=30)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            os.kill(worker.pid, signum)
        worker.join(timeout=1.0)
        assert worker.is_alive(), f"worker ended with {worker.exitcode}"
    finally:
        worker.kill()
        worker.join(timeout=10)
    assert worker.exitcode == -signal.SIGKILL
