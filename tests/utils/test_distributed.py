"""Process-group teardown and collective timeouts (dinov2/utils/distributed.py), on 2 gloo processes."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

RANKS = """
import os, sys, time
import torch
from dinov2.utils import distributed
info = distributed.enable(timeout_minutes=float(sys.argv[1]))
if info.rank == 1:
    if sys.argv[2] == "abort":
        distributed.abort()
        print("aborted", distributed.is_enabled(), flush=True)
    time.sleep(40)  # alive, but never joins the collective
else:
    start = time.monotonic()
    try:
        distributed.all_reduce_mean_(torch.ones(1))
        print("no error", flush=True)
    except RuntimeError as e:
        print(f"failed after {time.monotonic() - start:.1f} s", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(timeout_minutes: float, mode: str) -> tuple[str, str]:
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **ranks,
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        cmd = [sys.executable, "-c", textwrap.dedent(RANKS), str(timeout_minutes), mode]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    rank0 = procs[0].communicate(timeout=120)[0]
    procs[1].kill()
    rank1 = procs[1].communicate()[0]
    return rank0, rank1


def _seconds(line: str) -> float:
    assert line.startswith("failed after "), line
    return float(line.split()[2])


def test_abort_makes_the_other_rank_fail_at_once():
    # The collective timeout is 5 minutes and rank 1 is still alive: only the abort can end rank 0's wait.
    start = time.monotonic()
    rank0, rank1 = _two_ranks(5.0, "abort")
    assert rank1.strip() == "aborted False"
    assert _seconds(rank0.strip()) < 10 and time.monotonic() - start < 90


def test_collective_timeout_comes_from_the_argument():
    # Rank 1 never joins: the all_reduce fails after the 0.1-minute timeout, not gloo's 30 minutes.
    rank0, _ = _two_ranks(0.1, "hang")
    assert 5 <= _seconds(rank0.strip()) < 30


def test_env_world_size_and_rank_read_the_launcher_variables_before_the_process_group(monkeypatch):
    from dinov2.utils import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.env_world_size() == 1 and distributed.env_rank() == 0
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "5")
    assert not distributed.is_enabled()
    assert distributed.env_world_size() == 16 and distributed.env_rank() == 5
    assert distributed.get_global_size() == 1  # the process group's count: none exists yet
