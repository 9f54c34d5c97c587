"""torch.distributed set-up and queries as plain functions (no module-level state).

The process group is initialised from the environment that torchrun and the SLURM launcher set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every query reads torch.distributed, so
a single process without those variables behaves as rank 0 of 1.

A failing process calls `abort()` before it exits: the process group is torn down without waiting
for the other ranks, whose pending collectives then fail ("connection closed by peer") instead of
waiting for the collective timeout.

Usage:
    info = enable(timeout_minutes=10)  # before building models
    if is_main_process(): ...
    all_reduce_mean_(tensor)
"""

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("dinov2")

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a collective may wait for the slowest rank before it fails (train.collective_timeout_minutes).
DEFAULT_TIMEOUT_MINUTES = 10.0


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: global rank, number of processes, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_enabled() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_global_rank() -> int:
    """Rank of this process among all processes (0 when not distributed)."""
    return dist.get_rank() if is_enabled() else 0


def get_global_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_enabled() else 1


def env_rank() -> int:
    """Global rank from RANK, as set by torchrun or the SLURM launcher (0 when unset); readable
    before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """Processes in the job: the process group's size once it exists, else WORLD_SIZE as set by
    torchrun or the SLURM launcher (1 when unset); readable before the process group exists."""
    return get_global_size() if is_enabled() else int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    """Rank within this machine, from LOCAL_RANK (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_local_size() -> int:
    """Processes on this machine, from LOCAL_WORLD_SIZE (falls back to the global size)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(get_global_size())))


def is_main_process() -> bool:
    """True on global rank 0."""
    return get_global_rank() == 0


def default_device() -> torch.device:
    """cuda:<LOCAL_RANK> when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (torch.distributed.elastic sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def env_requests_distributed() -> bool:
    """True when the environment describes a multi-process job (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def enable(backend: str | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistributedInfo:
    """Initialise the process group from the environment when WORLD_SIZE > 1; return this process's info.

    Args:
        backend: "nccl" or "gloo"; None picks nccl when CUDA is available and gloo otherwise.
        timeout_minutes: how long a collective waits for a missing rank before it raises (NCCL:
            before its watchdog ends the process). Long enough for the slowest legitimate wait
            (rank 0 writing a checkpoint or running a kNN check while the others wait in a
            barrier), short enough that a hung rank does not hold the job's GPUs for long.
    Raises:
        ValueError naming the missing variable when WORLD_SIZE > 1 but RANK/MASTER_* are absent.
    """
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if is_enabled() or not env_requests_distributed():
        return DistributedInfo(get_global_rank(), get_global_size(), get_local_rank(), device)
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a distributed run but {missing} are not set "
            "(launch with torchrun, or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
        )
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    info = DistributedInfo(dist.get_rank(), dist.get_world_size(), get_local_rank(), device)
    logger.info("distributed: rank %d/%d (local %d) on %s via %s", info.rank, info.world_size,
                info.local_rank, device, backend)  # fmt: skip
    return info


def disable() -> None:
    """Destroy the process group if one is initialised."""
    if is_enabled():
        dist.destroy_process_group()


def abort() -> None:
    """Tear the process group down at once, after a failure on this rank (no-op when not distributed).

    Unlike `disable()` it does not wait for pending work or for the other ranks; their collectives
    with this rank fail promptly. Backends that cannot abort are destroyed instead.
    """
    if not is_enabled():
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception as e:  # an experimental API: any failure falls back to the plain teardown
        logger.warning("could not abort the process group (%s: %s); destroying it", type(e).__name__, e)
        if is_enabled():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_enabled():
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean of `tensor` over processes (unchanged when not distributed)."""
    if is_enabled() and get_global_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(get_global_size())
    return tensor


def all_reduce_max(value: float, device: torch.device | None = None) -> float:
    """Maximum of a Python number over processes."""
    if not is_enabled():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or default_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_true(flag: bool, device: torch.device | None = None) -> bool:
    """True on every process when `flag` is true on at least one (a collective)."""
    return all_reduce_max(1.0 if flag else 0.0, device) > 0.5


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj`, ordered by rank (a one-element list when not distributed)."""
    if not is_enabled():
        return [obj]
    out: list[Any] = [None] * get_global_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every process."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
