"""Signal handling shared by every DataLoader that may run inside a SLURM job."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM and SIGUSR2.

    SLURM signals every process of a job (preemption, time limit, `scontrol requeue`), workers
    included. torch makes a worker die on SIGTERM, and the main process then crashes before it can
    write its checkpoint. The main process decides when to stop (dinov2.train.preemption) and the
    workers end with it. Module-level so it pickles into spawned workers.
    """
    del worker_id
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
