"""What a SLURM task needs to know before it starts the entry point: the torch.distributed
variables torchrun would set (`distributed_environment`), with the rendezvous address (the job's
first node) and port (`master_port`, derived from the job id) that every task agrees on without
talking to the others.

Example (inside a task)::

    os.environ.update(distributed_environment())   # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...
"""

import os
import shutil
import socket
import subprocess
import zlib
from typing import Any

import submitit

# MASTER_PORT is picked in [PORT_BASE, PORT_BASE + PORT_SPAN) from the job id and restart count.
# The range ends below Linux's ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by
# default), from which the kernel hands out the source ports of outgoing connections (NCCL's own
# sockets included): a rendezvous port in that range can already be taken on the first node.
PORT_BASE = 10000
PORT_SPAN = 20000
EPHEMERAL_PORTS = (32768, 60999)
PORT_RULE = f"MASTER_PORT = {PORT_BASE} + crc32('<job id>:<restart count>') % {PORT_SPAN}"


def master_port(job_id: str, restart_count: int = 0) -> int:
    """A port derived from the job id (same on every task), moved on each requeue of the job so a
    restarted job never waits for the previous run's socket; always below the ephemeral range."""
    key = f"{job_id}:{restart_count}".encode()
    return PORT_BASE + zlib.crc32(key) % PORT_SPAN


def first_node_address(node_list: str, fallback: str) -> str:
    """Address of the first node of a SLURM node list such as "gpu[012-014],cpu7".

    The list is expanded with `scontrol show hostnames` (`fallback` when that fails). A host name
    that does not resolve is replaced by the node's NodeAddr from `scontrol show node`.
    """
    host = fallback
    if node_list and shutil.which("scontrol"):
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", node_list], capture_output=True, text=True, timeout=60
        )
        if proc.returncode == 0 and proc.stdout.split():
            host = proc.stdout.split()[0]
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    if shutil.which("scontrol"):
        cmd = ["scontrol", "show", "node", "-o", host]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        for field in proc.stdout.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    return host


def distributed_environment(job_env: Any = None) -> dict[str, str]:
    """The torch.distributed variables (as torchrun sets them) for this SLURM task.

    Args:
        job_env: a `submitit.JobEnvironment` (default: the current job's).
    """
    job_env = job_env if job_env is not None else submitit.JobEnvironment()
    num_tasks = job_env.num_tasks
    num_nodes = max(1, job_env.num_nodes)
    hostnames = list(job_env.hostnames)
    node_list = os.environ.get("SLURM_JOB_NODELIST", "")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes),
        "MASTER_ADDR": first_node_address(node_list, hostnames[0] if hostnames else job_env.hostname),
        "MASTER_PORT": str(master_port(str(job_env.raw_job_id), restarts)),
    }
