"""PreemptionFlag: handlers only record, should_stop is collective, previous handlers are chained."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dinov2.train.preemption import PreemptionFlag

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def recording_handlers():
    """Install recording handlers for SIGUSR2/SIGTERM (as submitit would) and restore afterwards."""
    calls: list[tuple[str, int]] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}

    def usr2(signum, frame):
        calls.append(("usr2-handler", signum))

    def term(signum, frame):
        calls.append(("term-handler", signum))

    signal.signal(signal.SIGUSR2, usr2)
    signal.signal(signal.SIGTERM, term)
    yield calls, usr2, term
    for s, h in saved.items():
        signal.signal(s, h)


def test_signal_only_sets_flag_then_chains_previous(recording_handlers):
    calls, usr2, term = recording_handlers
    flag = PreemptionFlag()
    assert not flag.is_set() and not flag.should_stop()
    os.kill(os.getpid(), signal.SIGUSR2)
    # The handler ran (Python runs it before the next bytecode) but did nothing except record.
    assert flag.received == [signal.SIGUSR2]
    assert flag.should_stop()  # no process group: the local flag
    assert calls == []
    flag.chain_previous_handler()
    assert calls == [("usr2-handler", signal.SIGUSR2)]
    flag.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is usr2
    assert signal.getsignal(signal.SIGTERM) is term


def test_chain_follows_arrival_order_and_repeats_count_once(recording_handlers):
    calls, _, _ = recording_handlers
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)  # what submitit's job._interrupt() sends first
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == [signal.SIGTERM, signal.SIGUSR2]
        flag.chain_previous_handler()
    assert calls == [("term-handler", signal.SIGTERM), ("usr2-handler", signal.SIGUSR2)]


def test_only_requested_signals_are_caught(recording_handlers):
    calls, _, term = recording_handlers
    with PreemptionFlag(signals=[signal.SIGUSR2]) as flag:
        assert signal.getsignal(signal.SIGTERM) is term
        os.kill(os.getpid(), signal.SIGTERM)
        assert not flag.is_set()
        assert calls == [("term-handler", signal.SIGTERM)]
    with pytest.raises(ValueError, match="at least one signal"):
        PreemptionFlag(signals=[])


def test_stacked_flags_forward_to_the_outer_one(recording_handlers):
    calls, usr2, _ = recording_handlers
    outer = PreemptionFlag()  # e.g. the SLURM launcher's, around train.main()
    inner = PreemptionFlag()  # e.g. the training loop's own
    os.kill(os.getpid(), signal.SIGUSR2)
    assert inner.received == [signal.SIGUSR2] and outer.received == [signal.SIGUSR2]
    inner.chain_previous_handler()  # previous is the outer flag: nothing to run
    assert calls == []
    inner.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == outer._handle
    outer.chain_previous_handler()
    assert calls == [("usr2-handler", signal.SIGUSR2)]
    outer.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is usr2


def test_signal_before_inner_flag_is_inherited(recording_handlers):
    outer = PreemptionFlag()
    os.kill(os.getpid(), signal.SIGTERM)
    inner = PreemptionFlag()
    assert inner.should_stop() and inner.received == [signal.SIGTERM]
    inner.uninstall()
    outer.uninstall()


def test_uninstall_leaves_a_later_handler_alone(recording_handlers):
    flag = PreemptionFlag()

    def later(signum, frame):
        pass

    signal.signal(signal.SIGUSR2, later)
    flag.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is later
    with pytest.raises(RuntimeError, match="twice"):
        f2 = PreemptionFlag()
        f2.install()
    f2.uninstall()


def test_ignored_previous_handler_is_not_run():
    saved = signal.getsignal(signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with PreemptionFlag(signals=[signal.SIGUSR2]) as flag:
            os.kill(os.getpid(), signal.SIGUSR2)
            flag.chain_previous_handler()  # SIG_IGN: nothing happens, we are still alive
            assert flag.is_set()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, saved)


def _run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def test_default_previous_handler_is_reraised_after_the_checkpoint():
    # Outside submitit (torchrun, plain python) SIGTERM's previous handler is SIG_DFL: the loop gets
    # to save first, then chaining ends the process the way SIGTERM would have.
    proc = _run_python(
        """
        import os, signal
        from dinov2.train.preemption import PreemptionFlag
        flag = PreemptionFlag()
        os.kill(os.getpid(), signal.SIGTERM)
        print("saved checkpoint", flag.should_stop(), flush=True)
        flag.chain_previous_handler()
        print("still alive", flush=True)
        """
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.strip() == "saved checkpoint True"


def test_sigint_is_caught_once_then_has_its_default_action():
    # The first Ctrl-C is recorded like a preemption signal (the loop saves and stops); the second
    # one must end the process at once, whatever the main thread is doing (here: blocked in sleep).
    proc = _run_python(
        """
        import os, signal, time
        from dinov2.train.preemption import DEFAULT_SIGNALS, PreemptionFlag
        flag = PreemptionFlag(signals=(*DEFAULT_SIGNALS, signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)
        print("first", flag.received == [signal.SIGINT], flag.interrupted(), flag.should_stop(), flush=True)
        print("disarmed", signal.getsignal(signal.SIGINT) == signal.SIG_DFL, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("still alive", flush=True)
        """,
        timeout=25,
    )
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["first True True True", "disarmed True"]


def test_sigint_flag_uninstall_restores_python_handler_and_preemption_wins():
    previous = signal.getsignal(signal.SIGINT)
    flag = PreemptionFlag(signals=(signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.interrupted() and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        assert not flag.interrupted()  # a preemption signal too: the job must requeue, not just stop
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous


def test_install_outside_main_thread_is_a_clear_error():
    proc = _run_python(
        """
        import threading
        from dinov2.train.preemption import PreemptionFlag
        errors = []
        def worker():
            try:
                PreemptionFlag()
            except RuntimeError as e:
                errors.append(str(e))
        t = threading.Thread(target=worker, name="loader"); t.start(); t.join()
        print(errors[0])
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "main thread" in proc.stdout and "'loader'" in proc.stdout


_GLOO_WORKER = """
import json, os, signal, sys
import torch.distributed as dist
from dinov2.train.preemption import PreemptionFlag

dist.init_process_group("gloo")
rank = dist.get_rank()
flag = PreemptionFlag()
stopped_at, locally_set = None, None
for step in range(50):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled
    locally_set = flag.is_set()
    if flag.should_stop():
        stopped_at = step
        break
print(json.dumps({"rank": rank, "stopped_at": stopped_at, "locally_set": locally_set,
                  "received": [s.name for s in flag.received]}), flush=True)
flag.uninstall()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_flagged_stops_both_ranks_at_the_same_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_GLOO_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_ROOT),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, str(script)]
        pipe = subprocess.PIPE
        procs.append(subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env))
    results = {}
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo workers did not finish within 120 s (a rank did not stop)")
        assert p.returncode == 0, err
        r = json.loads(out.strip().splitlines()[-1])
        results[r["rank"]] = r
    # Both ranks stop at step 3 although only rank 1 caught the signal, and rank 0 learns which one.
    assert results[0]["stopped_at"] == 3 and results[1]["stopped_at"] == 3
    assert results[0]["locally_set"] is False and results[1]["locally_set"] is True
    assert results[0]["received"] == ["SIGUSR2"] and results[1]["received"] == ["SIGUSR2"]
