"""Run the training CLI with injected faults (test-only; used by tests/train/test_failfast.py).

    python tests/train/fault_injection.py FAULT [FAULT ...] -- [dinov2-train arguments]
    torchrun --nproc_per_node=2 tests/train/fault_injection.py raise-in-step:3:1 -- [arguments]

The faults monkeypatch library functions in this process (and, through fork, in its DataLoader
workers) and then run `dinov2.train.train.main()` exactly as the `dinov2-train` console script
does, so exit status, logging and clean-up are the CLI's own. Nothing in `dinov2/` knows about this
file. FAULT is one of:

    raise-in-step:K[:R]     train_step raises RuntimeError at iteration K (on rank R only)
    sleep-in-step:K:S       train_step sleeps S seconds at iteration K (on every rank), then runs
    nan-loss:K              the losses of iteration K are NaN (the step sees a non-finite loss)
    sigint-in-step:K:N      N SIGINTs reach this process during iteration K (0.5 s apart)
    raise-in-worker:P       the DataLoader worker loading stream position P raises RuntimeError
    kill-worker:P           the DataLoader worker loading stream position P is killed by SIGKILL
    enospc-on-save:K        torch.save raises OSError(ENOSPC) after a partial write, for the
                            training checkpoint of iteration K

Iterations count from 0 (the K-th call of train_step is iteration K of a fresh run).
"""

import errno
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's dinov2


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def announce(what: str) -> None:
    """Print when a fault fires (wall clock), so a test can time the exit from that moment."""
    print(f"fault-injection: {what} at {time.time():.3f}", file=sys.stderr, flush=True)


def _patch_step(when) -> None:
    """Wrap dinov2.train.train.train_step so that `when(it)` runs before iteration `it`."""
    import dinov2.train.train as train_module

    real = train_module.train_step

    def step(model, optimizer, scaler, averager, data, schedules, it, cfg):
        when(it)
        return real(model, optimizer, scaler, averager, data, schedules, it, cfg)

    train_module.train_step = step


def raise_in_step(k: str, rank: str | None = None) -> None:
    def when(it):
        if it == int(k) and (rank is None or _rank() == int(rank)):
            announce(f"raise-in-step iteration {it} rank {_rank()}")
            raise RuntimeError(f"injected fault: train_step raised at iteration {it} on rank {_rank()}")

    _patch_step(when)


def sleep_in_step(k: str, seconds: str) -> None:
    def when(it):
        if it == int(k):
            announce(f"sleep-in-step iteration {it} rank {_rank()}")
            time.sleep(float(seconds))

    _patch_step(when)


def sigint_in_step(k: str, count: str) -> None:
    def when(it):
        if it == int(k):
            for i in range(int(count)):
                if i:
                    time.sleep(0.5)  # the first signal's handler has run by now
                announce(f"SIGINT {i + 1} iteration {it}")
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)

    _patch_step(when)


def nan_loss(k: str) -> None:
    import torch

    from dinov2.train.ssl_meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def forward_backward(self, images, teacher_temp, grad_scaler=None):
        losses = real(self, images, teacher_temp, grad_scaler)
        if calls["n"] == int(k):
            announce(f"nan-loss call {calls['n']}")
            losses["dino_global_crops_loss"] = torch.tensor(float("nan"))
        calls["n"] += 1
        return losses

    SSLMetaArch.forward_backward = forward_backward


def _patch_worker_load(act) -> None:
    """Wrap the loader's per-sample __getitem__ so that `act(position)` runs inside workers."""
    import torch.utils.data

    from dinov2.data.loaders import SeededSampleDataset

    real = SeededSampleDataset.__getitem__

    def getitem(self, key):
        if torch.utils.data.get_worker_info() is not None:
            act(key[1])
        return real(self, key)

    SeededSampleDataset.__getitem__ = getitem


def raise_in_worker(position: str) -> None:
    def act(p):
        if p == int(position):
            announce(f"raise-in-worker position {p}")
            raise RuntimeError(f"injected fault: loading stream position {p} failed")

    _patch_worker_load(act)


def kill_worker(position: str) -> None:
    def act(p):
        if p == int(position):
            announce(f"kill-worker position {p}")
            os.kill(os.getpid(), signal.SIGKILL)

    _patch_worker_load(act)


def enospc_on_save(k: str) -> None:
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("iteration") == int(k):
            announce(f"enospc-on-save iteration {k}")
            f.write(b"partial checkpoint bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    torch.save = save


FAULTS = {
    "raise-in-step": raise_in_step,
    "sleep-in-step": sleep_in_step,
    "sigint-in-step": sigint_in_step,
    "nan-loss": nan_loss,
    "raise-in-worker": raise_in_worker,
    "kill-worker": kill_worker,
    "enospc-on-save": enospc_on_save,
}


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(f"usage: {Path(__file__).name} FAULT [FAULT ...] -- [dinov2-train arguments]")
    split = argv.index("--")
    for spec in argv[:split]:
        name, *params = spec.split(":")
        if name not in FAULTS:
            raise SystemExit(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        FAULTS[name](*params)
    from dinov2.train.train import main as train_main

    sys.argv = [sys.argv[0], *argv[split + 1 :]]
    train_main()  # the console script's call: ends the process with the CLI's exit status
    raise SystemExit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
