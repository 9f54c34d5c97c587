"""Graceful stop on preemption and time limits: signal handlers that only raise a flag.

SLURM announces the end of a job with a signal: the launcher asks for SIGUSR2 some time before the time
limit (`#SBATCH --signal=USR2@120`), preemption sends SIGTERM (and submitit's test helper
`job._interrupt()` sends SIGTERM then SIGUSR2), and `scancel` / `scontrol requeue` send SIGTERM
before killing the job. Acting inside the handler (submitit's default: checkpoint and requeue at
once) abandons the current step and everything since the last periodic checkpoint. Instead the
handlers of `PreemptionFlag` only record the signal; the training loop asks `should_stop()` at each
step boundary, and when it says yes the loop saves a checkpoint and returns. The launcher then calls
`chain_previous_handler()`, which runs the handler that was installed before (submitit's
checkpoint-and-requeue on rank 0), so the requeued job resumes from that checkpoint.

`should_stop()` is a collective when a torch.distributed process group is initialised: every rank
must call it at the same step, and all ranks stop together as soon as any rank got a signal
(signals reach ranks at slightly different times; stopping alone would hang the others).

SLURM signals every process of the job, DataLoader workers included: workers must ignore SIGTERM
and SIGUSR2 (a `worker_init_fn` setting SIG_IGN), or torch's worker SIGTERM handler kills them and
the main process fails before it can save.

Ctrl-C (SIGINT) can be caught the same way, once: `PreemptionFlag(signals=(*DEFAULT_SIGNALS,
signal.SIGINT))` records the first SIGINT like the others (the loop finishes its step, checkpoints
and stops) and at once restores SIGINT's default action, so a second Ctrl-C ends the process
immediately, even in the middle of a step or of a blocked collective, without a checkpoint.

Flags stack: a flag installed over another flag's handler forwards what it records to the outer
one, so a launcher can install a flag around `train.main()`, which installs its own, and still learn
that a signal arrived.

Usage (training loop):
    flag = PreemptionFlag()                 # in the main thread, before the loop
    try:
        for it in ...:
            if flag.should_stop():
                save_checkpoint(...)
                return TrainResult(status="preempted", iteration=it)
            step(...)
    finally:
        flag.uninstall()
"""

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("dinov2")

Handler = Callable[[int, FrameType | None], Any] | int | None

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Records SIGUSR2/SIGTERM (or `signals`) and lets a loop stop at a step boundary.

    Args:
        signals: signals to catch; SIGUSR2 is submitit's time-limit/preemption signal, SIGTERM the
            one SLURM sends before killing a job (preemption, scancel, scontrol requeue). SIGINT,
            when listed, is caught once (a second one has its default action: the process ends).
        install: install the handlers now (must run in the main thread); else call `install()`.

    Attributes:
        received: the caught signals, each once, in order of arrival (after `should_stop()` also the
            ones other ranks caught).
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, install: bool = True) -> None:
        if not signals:
            raise ValueError("PreemptionFlag needs at least one signal to catch, got an empty list")
        self.signals: tuple[signal.Signals, ...] = tuple(signal.Signals(s) for s in signals)
        self.received: list[signal.Signals] = []
        self._previous: dict[signal.Signals, Handler] = {}
        self._disarmed: set[signal.Signals] = set()  # caught once, now back to the default action
        if install:
            self.install()

    # -- handlers ---------------------------------------------------------------------------
    def install(self) -> None:
        """Install the handlers, remembering the ones they replace (for chaining and uninstall).

        When the replaced handler belongs to another PreemptionFlag, signals that one already
        recorded are inherited, so nothing caught before this flag existed is lost.
        """
        if self._previous:
            raise RuntimeError("PreemptionFlag.install() called twice; call uninstall() first")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionFlag must be installed from the main thread (Python delivers signals there); "
                f"called from thread {threading.current_thread().name!r}"
            )
        for signum in self.signals:
            previous = signal.getsignal(signum)
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
            outer = _flag_of(previous)
            if outer is not None and signum in outer.received:
                self._record(signum)

    def uninstall(self) -> None:
        """Put back the handlers that were installed before, where ours is still the active one."""
        for signum, previous in self._previous.items():
            current = signal.getsignal(signum)
            if current == self._handle or (signum in self._disarmed and current == signal.SIG_DFL):
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            else:
                logger.warning("preemption: handler for %s was replaced meanwhile; leaving it", signum.name)
        self._previous = {}
        self._disarmed = set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: do nothing but record.
        signum = signal.Signals(signum)
        if signum == signal.SIGINT:
            # The kernel, not this interpreter, acts on the next Ctrl-C: it ends the process even
            # while the main thread waits in C code (a collective, a long kernel).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            self._disarmed.add(signum)
            logger.warning("interrupted (Ctrl-C): finishing this step and saving a checkpoint; press "
                           "Ctrl-C again to quit at once without one")  # fmt: skip
        self._record(signum)

    def _record(self, signum: signal.Signals, forwarded: bool = False) -> None:
        if signum not in self.received:
            self.received.append(signum)
            if not forwarded and signum != signal.SIGINT:  # SIGINT's handler says more
                logger.warning("preemption: received %s, stopping at the next step boundary", signum.name)
        outer = _flag_of(self._previous.get(signum))
        if outer is not None:
            outer._record(signum, forwarded=True)

    # -- queries ----------------------------------------------------------------------------
    def interrupted(self) -> bool:
        """True when the stop was asked by Ctrl-C (SIGINT) only, not by a preemption signal."""
        return bool(self.received) and all(s == signal.SIGINT for s in self.received)

    def is_set(self) -> bool:
        """True when this process caught one of the signals (local, no communication)."""
        return bool(self.received)

    def should_stop(self, group: Any = None) -> bool:
        """True on every rank when any rank caught a signal; call at each step boundary.

        A collective (one all_reduce of a few numbers) when torch.distributed is initialised: all
        ranks of `group` must call it at the same point. Without a process group it is `is_set()`.
        The training step does not call this: it sends `local_flags()` along with its losses'
        all_reduce and hands the sums to `merge_flags()`, which saves a synchronisation per step.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.is_set()
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        caught = torch.tensor(self.local_flags(), device=device)
        dist.all_reduce(caught, op=dist.ReduceOp.MAX, group=group)
        return self.merge_flags(caught.tolist())

    def local_flags(self) -> list[float]:
        """1.0 for each of `signals` this process caught, else 0.0 (to be reduced over processes)."""
        return [float(s in self.received) for s in self.signals]

    def merge_flags(self, reduced: Sequence[float]) -> bool:
        """Record the signals that `reduced` (the sum or max over processes of `local_flags()`) shows
        some process caught; return whether any did. Every process gets the same answer (a signal
        this process caught after taking its flags counts at the next exchange)."""
        if len(reduced) != len(self.signals):
            raise ValueError(f"expected {len(self.signals)} reduced flags, got {len(reduced)}")
        for signum, anywhere in zip(self.signals, reduced):
            if anywhere > 0.5:
                self._record(signum)
        return any(x > 0.5 for x in reduced)

    # -- after the loop stopped -----------------------------------------------------------------
    def chain_previous_handler(self) -> None:
        """Run, for each received signal in order, the handler this flag replaced.

        A Python handler is called as `handler(signum, None)` (submitit's on rank 0 checkpoints,
        requeues the job and exits the process via SystemExit). SIG_DFL is honoured by restoring the
        default disposition and re-sending the signal (for SIGTERM/SIGUSR2: the process ends);
        SIG_IGN does nothing.
        """
        for signum in list(self.received):
            previous = self._previous.get(signum, signal.SIG_DFL)
            if _flag_of(previous) is not None or previous == signal.SIG_IGN:
                continue  # an outer flag already knows; an ignored signal has no action
            if callable(previous):
                logger.info("preemption: running the previous %s handler %r", signum.name, previous)
                previous(signum, None)
            else:
                logger.info("preemption: re-raising %s with its default action", signum.name)
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def __repr__(self) -> str:
        names = ",".join(s.name for s in self.signals)
        got = ",".join(s.name for s in self.received) or "none"
        return f"PreemptionFlag(signals={names}, received={got}, installed={bool(self._previous)})"


def _flag_of(handler: Handler) -> "PreemptionFlag | None":
    """The PreemptionFlag whose bound `_handle` is `handler`, else None."""
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, PreemptionFlag) and getattr(handler, "__func__", None) is PreemptionFlag._handle:
        return owner
    return None
