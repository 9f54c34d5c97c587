"""Run a function on N CPU processes joined in a gloo process group, and collect rank 0's result.

    out = run_on_gloo(_train_two_ranks, tmp_path)          # _train_two_ranks(rank, world) -> dict

The function must be defined at module level (the spawned processes import it by name); each
process uses one torch thread, so two of them fit the 2-core machines.
"""

from pathlib import Path
from typing import Any

import torch


def run_on_gloo(fn, tmp_path: Path, world: int = 2) -> Any:
    """`fn(rank, world)` on `world` spawned processes; the value rank 0 returned."""
    import torch.multiprocessing as mp

    mp.spawn(_run_rank, args=(world, str(tmp_path), fn), nprocs=world, join=True)
    return torch.load(Path(tmp_path) / "out.pt")


def _run_rank(rank: int, world: int, tmp: str, fn) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        out = fn(rank, world)
        if rank == 0:
            torch.save(out, f"{tmp}/out.pt")
    finally:
        dist.destroy_process_group()
