"""Signal handling shared by every DataLoader that may run inside a SLURM job, and process lifetimes.

Two rules keep a job's process tree honest:
- DataLoader workers never decide when to stop: SLURM signals every process of a job (preemption,
  time limit, `scontrol requeue`), and a terminal's Ctrl-C reaches every process of the foreground
  group. The main process decides (dinov2.train.preemption) and stops its workers itself.
- Nothing outlives the process it serves: training DataLoader workers die with the training process
  (`training_worker_init`) and training ranks with their torchrun agent (`die_with_parent`), so a
  killed parent leaves no orphans holding memory, GPUs or a half-open collective.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys

# From <linux/prctl.h>: deliver a signal to this process when its parent thread exits.
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL, expected_parent: int | None = None) -> bool:
    """Ask Linux to send `signum` to this process when its parent exits (prctl PR_SET_PDEATHSIG).

    The kernel delivers the signal even when the parent is killed by SIGKILL, which no handler in
    the parent could forward. With `expected_parent`, a parent that already exited before this call
    (this process was re-parented) triggers `signum` at once. Returns False where the platform has
    no such facility (not Linux): there the caller's other clean-up paths are all there is.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG, {signum}) failed: {os.strerror(err)}")
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signum)
    return True


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM and SIGUSR2.

    torch makes a worker die on SIGTERM, and the main process then crashes before it can write its
    checkpoint. The main process decides when to stop (dinov2.train.preemption) and the workers end
    with it. Because workers ignore SIGTERM, a loader must be shut down explicitly
    (`dinov2.data.loaders.stop_workers`) before the interpreter exits: multiprocessing's exit handler
    stops leftover daemon processes with SIGTERM and then waits for them. Module-level so it pickles
    into spawned workers.
    """
    del worker_id
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def training_worker_init(worker_id: int) -> None:
    """The training loader's `worker_init_fn`: `ignore_stop_signals`, SIGINT too, and die with the
    training process.

    Ctrl-C in a terminal reaches the workers as well; torch's worker loop then quits quietly and
    the main process, which is finishing its step to write a checkpoint, would fail on the next
    batch with "worker exited unexpectedly". The training loop handles Ctrl-C for the whole tree.
    The parent-death signal is bound to the thread that started the worker; training starts its
    workers from the main thread (its signal handlers need that thread anyway), so the signal means
    "the training process is gone".
    """
    ignore_stop_signals(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    die_with_parent(signal.SIGKILL, parent.pid if parent is not None else None)
