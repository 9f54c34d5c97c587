"""scripts/slurm_sacct_shim/sacct answers submitit's state queries from `scontrol show job`."""

import os
import subprocess
from pathlib import Path

import pytest
from submitit.slurm.slurm import SlurmInfoWatcher

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = REPO_ROOT / "scripts" / "slurm_sacct_shim"

# What `scontrol show job -o` prints (trimmed): a split array (two tasks + a pending range), a job
# being configured, a held requeued job and a cancelled one with a multi-word field.
JOBS = {
    "12": [
        "JobId=13 ArrayJobId=12 ArrayTaskId=0 JobName=a UserId=root(0) JobState=RUNNING Reason=None "
        "Partition=debug NodeList=vm ExitCode=0:0",
        "JobId=14 ArrayJobId=12 ArrayTaskId=1 JobName=a UserId=root(0) JobState=COMPLETED Reason=None "
        "Partition=debug NodeList=vm ExitCode=0:0",
        "JobId=12 ArrayJobId=12 ArrayTaskId=2-3%2 JobName=a UserId=root(0) JobState=PENDING "
        "Reason=JobArrayTaskLimit Partition=debug NodeList=(null) ExitCode=0:0",
    ],
    "20": [
        "JobId=20 JobName=b c UserId=alice(1001) JobState=CONFIGURING Partition=gpu NodeList=n[1-2] "
        "ExitCode=0:0"
    ],
    "21": [
        "JobId=21 JobName=d UserId=root(0) JobState=REQUEUE_HOLD Partition=debug NodeList=(null) ExitCode=0:0"
    ],
    "22": [
        "JobId=22 JobName=e UserId=root(0) JobState=CANCELLED Reason=None Partition=debug NodeList=vm "
        "ExitCode=0:15"
    ],
}


@pytest.fixture()
def fake_scontrol(tmp_path):
    """A `scontrol` that prints the canned records above (and fails like SLURM for unknown ids)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cases = "\n".join(
        f"  {jid}) cat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n  ;;" for jid, lines in JOBS.items()
    )
    script = bindir / "scontrol"
    script.write_text(
        "#!/usr/bin/env bash\n"
        '[ "$1 $2 $3" = "show job -o" ] || { echo "unexpected: $*" >&2; exit 9; }\n'
        'case "$4" in\n' + cases + "\n"
        '  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;\nesac\n'
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{SHIM_DIR}:{bindir}:{os.environ['PATH']}"}


def _sacct(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sacct", *args], capture_output=True, text=True, env=env, timeout=60)


def test_submitit_query_is_answered_in_sacct_format(fake_scontrol):
    proc = _sacct(
        fake_scontrol, "-o", "JobID,State,NodeList", "--parsable2", "-j", "12", "-j", "20,21", "-j", "99"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "JobID|State|NodeList",
        "12_0|RUNNING|vm",
        "12_1|COMPLETED|vm",
        "12_[2-3%2]|PENDING|None assigned",
        "20|RUNNING|n[1-2]",  # CONFIGURING is still alive for submitit
        "21|REQUEUED|None assigned",  # held after requeue: not finished
    ]
    # submitit reads it back: array ranges expanded, every state as a job that is not done yet
    info = SlurmInfoWatcher().read_info(proc.stdout)
    assert {k: v["State"] for k, v in info.items()} == {
        "12_0": "RUNNING",
        "12_1": "COMPLETED",
        "12_2": "PENDING",
        "12_3": "PENDING",
        "20": "RUNNING",
        "21": "REQUEUED",
    }


def test_single_array_task_and_other_fields(fake_scontrol):
    proc = _sacct(fake_scontrol, "-P", "-n", "-j", "12_1", "--format=JobID,JobName,User,ExitCode,Partition")
    assert proc.stdout.splitlines() == ["12_1|a|root|0:0|debug"]
    proc = _sacct(fake_scontrol, "-p", "-j", "20", "-o", "jobname,user,state")
    assert proc.stdout.splitlines() == ["jobname|user|state|", "b c|alice|RUNNING|"]


def test_default_table_output(fake_scontrol):
    proc = _sacct(fake_scontrol, "-j", "22")
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["JobID", "JobName", "Partition", "Account", "AllocCPUS", "State", "ExitCode"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["22", "e", "debug", "CANCELLED", "0:15"]


@pytest.mark.parametrize(
    "args,message",
    [(["-o", "JobID,Bogus"], 'Invalid field requested: "Bogus"'), (["-S", "now"], "unsupported option '-S'")],
)
def test_bad_queries_fail_clearly(fake_scontrol, args, message):
    proc = _sacct(fake_scontrol, *args)
    assert proc.returncode == 1 and message in proc.stderr


def test_parse_of_records_with_spaces():
    # the shim is a script, not a module: load it to test its parser directly
    namespace: dict = {}
    source = (SHIM_DIR / "sacct").read_text()
    exec(compile(source.replace('if __name__ == "__main__":', "if False:"), "sacct", "exec"), namespace)
    record = namespace["parse_record"](JOBS["20"][0])
    assert record["JobName"] == "b c" and record["UserId"] == "alice(1001)" and record["NodeList"] == "n[1-2]"
