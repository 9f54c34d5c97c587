"""A real single-node SLURM cluster for the launcher tests (scripts/slurm_local_cluster.sh).

The session fixture starts the cluster in a private state dir on free ports, points this process at
it (SLURM_CONF, and the sacct shim first on PATH so submitit sees job states), and stops exactly the
daemons it started at the end. It skips only when SLURM cannot be installed (script exit status 3).
"""

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm_local_cluster.sh"
SHIM_DIR = REPO_ROOT / "scripts" / "slurm_sacct_shim"
PARTITION = "debug"


@dataclass
class SlurmCluster:
    """The running test cluster: its state dir, partition and the environment to talk to it."""

    state_dir: Path
    partition: str
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)

    @staticmethod
    def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.5) -> object:
        """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    def wait_for_job(self, job, timeout: float) -> None:
        """Wait for a submitit job to finish (cancelling it on timeout so nothing keeps running)."""
        deadline = time.monotonic() + timeout
        while not job.done(force_check=True):
            if time.monotonic() > deadline:
                self.run("scancel", job.job_id)
                logs = "\n".join(
                    f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(job.paths.folder.glob("*_log.*"))
                )
                pytest.fail(f"job {job.job_id} did not finish within {timeout:.0f} s; logs:\n{logs}")
            time.sleep(1)

    def job_field(self, job_id: str, key: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        for token in out.split():
            if token.startswith(key + "="):
                return token.split("=", 1)[1]
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    state_dir = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "DINOV2_SLURM_DIR": str(state_dir),
        "DINOV2_SLURM_PARTITION": PARTITION,
        "DINOV2_SLURM_CTLD_PORT": str(_free_port()),
        "DINOV2_SLURM_SLURMD_PORT": str(_free_port()),
        "DINOV2_SLURM_CPUS": "4",
    }
    start = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=600
    )
    if start.returncode == 3:
        pytest.skip(f"SLURM cannot be installed on this machine: {start.stderr.strip().splitlines()[-1]}")
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local SLURM cluster did not start:\n{start.stderr}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
    os.environ["PATH"] = f"{SHIM_DIR}:{os.environ['PATH']}"
    cluster = SlurmCluster(
        state_dir, PARTITION, {**env, "SLURM_CONF": os.environ["SLURM_CONF"], "PATH": os.environ["PATH"]}
    )
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
