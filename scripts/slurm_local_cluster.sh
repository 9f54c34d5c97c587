#!/usr/bin/env bash
# Start, stop or inspect a throw-away single-node SLURM cluster on this machine, so the SLURM
# launchers (dinov2/run/...) can be tried and tested without a real cluster.
#
# Usage, from the repository root (start/stop need root: slurmd starts jobs as the submitting user):
#   sudo scripts/slurm_local_cluster.sh start    # install packages if missing, start munged/slurmctld/slurmd
#   eval "$(scripts/slurm_local_cluster.sh env)" # point sbatch/squeue/... and sacct at this cluster
#   python -m dinov2.data.synthetic --out /tmp/dinov2-cells --per-class 20 --size 64
#   python dinov2/run/train/train.py --config-file dinov2/configs/train/vit_tiny_cpu.yaml \
#       --output-dir /tmp/dinov2-try --partition debug --ngpus 0 --ntasks-per-node 2 --cpus-per-task 1 \
#       train.dataset_path=/tmp/dinov2-cells train.max_iterations=20 train.batch_size_per_gpu=8
#   squeue; tail -f /tmp/dinov2-try/<job id>/<job id>_0_log.out; ls /tmp/dinov2-try/checkpoints
#   scripts/slurm_local_cluster.sh status
#   sudo scripts/slurm_local_cluster.sh stop     # cancel jobs, stop the daemons this script started
# Exit status: 0 ok, 1 error, 2 usage, 3 SLURM cannot be installed/started here (tests skip on 3).
#
# What it does:
# - Installs the Debian/Ubuntu packages `slurmctld slurmd slurm-client munge` with apt-get when
#   `slurmctld`, `slurmd`, `sbatch` or `munged` is missing (needs root; elsewhere install them yourself).
# - Keeps everything else under one state directory (default /tmp/dinov2-slurm, override with
#   DINOV2_SLURM_DIR): its own munge key and socket, slurm.conf, state/spool dirs, logs and the PIDs
#   of the daemons it started. System files (/etc/slurm, /etc/munge) are not touched, and the
#   cluster listens on its own ports (DINOV2_SLURM_CTLD_PORT=16817, DINOV2_SLURM_SLURMD_PORT=16818)
#   so a system SLURM keeps working.
# - One node named after `hostname -s` (address 127.0.0.1) in partition `debug` (Default=YES,
#   override with DINOV2_SLURM_PARTITION), advertising DINOV2_SLURM_CPUS CPUs (default: max(4, nproc),
#   more than the cores is fine for tiny CPU jobs) and ~85 % of the RAM; no GPUs, no cgroups
#   (proctrack/linuxproc, task/none), no accounting database.
# - Without accounting `sacct` cannot answer, and submitit polls `sacct` for job states: `env`
#   therefore also puts scripts/slurm_sacct_shim (a small sacct that answers from `scontrol show job`)
#   first on PATH.
# - Short delays so tests are quick: batch jobs start within ~1 s (batch_sched_delay=0) and a
#   requeued job restarts after ~12 s instead of ~2 min (AuthInfo cred_expire=10).
# - `stop` cancels this cluster's jobs, then stops exactly the PIDs recorded at `start` (TERM, then
#   KILL after 10 s); it never kills processes by name.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${DINOV2_SLURM_DIR:-/tmp/dinov2-slurm}"
PARTITION="${DINOV2_SLURM_PARTITION:-debug}"
CTLD_PORT="${DINOV2_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${DINOV2_SLURM_SLURMD_PORT:-16818}"
NODE_NAME="$(hostname -s)"
CONF="$STATE_DIR/etc/slurm.conf"
# The socket sits outside the private munge/ folder (key only) so non-root users can submit.
MUNGE_SOCKET="$STATE_DIR/run/munge.socket"
SHIM_DIR="$SCRIPT_DIR/slurm_sacct_shim"
START_TIMEOUT_S="${DINOV2_SLURM_START_TIMEOUT_S:-60}"

say() { echo "[slurm_local_cluster] $*" >&2; }
die() {
    say "error: $*"
    exit 1
}
# Exit status 3 means "SLURM cannot be installed or started here" (no apt-get, not root): tests skip
# on it; every other failure is an error.
die_install() {
    say "error: $*"
    exit 3
}

# True when PID $1 is alive and still the daemon we started (its command line names program $2
# and this state dir), so a recycled PID is never signalled.
is_our_pid() {
    local pid="$1" prog="$2" cmdline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *"$prog"* && "$cmdline" == *"$STATE_DIR"* ]]
}

pid_of() { cat "$STATE_DIR/pids/$1.pid" 2>/dev/null || true; }

daemon_running() { is_our_pid "$(pid_of "$1")" "$1"; }

# Wait (at most $1 seconds) until command "${@:2}" succeeds.
wait_for() {
    local timeout="$1"
    shift
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then return 1; fi
        sleep 0.5
    done
}

ensure_packages() {
    local missing=()
    for prog in slurmctld slurmd sbatch munged; do
        command -v "$prog" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$prog" >/dev/null 2>&1 ||
            missing+=("$prog")
    done
    if [ "${#missing[@]}" -eq 0 ]; then return 0; fi
    say "missing programs: ${missing[*]}; installing Debian packages slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null 2>&1 ||
        die_install "apt-get not found: install SLURM (slurmctld, slurmd, client tools) and munge yourself"
    [ "$(id -u)" -eq 0 ] || die_install "installing packages needs root: run this script with sudo"
    local pkgs=(slurmctld slurmd slurm-client munge)
    # policy-rc.d style: never let the packages start system services; we start our own daemons.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
        >"$STATE_DIR/log/apt.log" 2>&1; then
        say "apt-get install failed; running apt-get update first"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$STATE_DIR/log/apt.log" 2>&1 ||
            die_install "apt-get update failed (see $STATE_DIR/log/apt.log)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
            >>"$STATE_DIR/log/apt.log" 2>&1 || die_install "apt-get install failed (see $STATE_DIR/log/apt.log)"
    fi
    say "installed: $(sinfo --version 2>/dev/null || echo 'slurm')"
}

write_conf() {
    local cpus mem_mb
    cpus="${DINOV2_SLURM_CPUS:-$(($(nproc) > 4 ? $(nproc) : 4))}"
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 * 0.85 / 1024}' /proc/meminfo)
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local_cluster.sh: a single-node test cluster (no cgroups, no accounting).
ClusterName=dinov2local
SlurmctldHost=$NODE_NAME(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may restart ~12 s later instead of ~2 min.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Start batch jobs right away, and look at pending (e.g. requeued) jobs every 2 s instead of 30-60 s.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Keep finished jobs visible to scontrol (and so to the sacct shim) for an hour.
MinJobAge=3600
KillWait=30
InactiveLimit=0
JobRequeue=1
# Advertising more CPUs than the machine has is allowed (tiny CPU jobs share cores).
SlurmdParameters=config_overrides
NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF (node $NODE_NAME, $cpus CPUs, ${mem_mb} MB, partition $PARTITION)"
}

start_daemon() {
    # start_daemon NAME CMD...: run CMD in the foreground of a background subshell, record its PID.
    local name="$1"
    shift
    say "starting $name: $*"
    setsid "$@" >"$STATE_DIR/log/$name.stdout" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/pids/$name.pid"
}

cluster_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$SHIM_DIR:\$PATH"
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] ||
        die_install "starting the cluster needs root (slurmd starts jobs as their users): run with sudo"
    mkdir -p "$STATE_DIR"/{etc,ctld,spool,log,run,pids,munge}
    chmod 700 "$STATE_DIR/munge"
    ensure_packages
    export PATH="$PATH:/usr/sbin:/sbin"
    if daemon_running slurmctld || daemon_running slurmd || daemon_running munged; then
        die "a cluster from $STATE_DIR is already running (run '$0 stop' first, or '$0 status')"
    fi
    rm -rf "${STATE_DIR:?}"/{ctld,spool,run}/* "${STATE_DIR:?}"/pids/*
    if [ ! -s "$STATE_DIR/munge/munge.key" ]; then
        say "creating munge key $STATE_DIR/munge/munge.key"
        dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE_DIR/munge/munge.key"
    fi
    # --force: the state dir lives under /tmp, whose permissions munged would otherwise refuse.
    start_daemon munged munged --foreground --force --key-file="$STATE_DIR/munge/munge.key" \
        --socket="$MUNGE_SOCKET" --pid-file="$STATE_DIR/run/munged.pid" \
        --log-file="$STATE_DIR/log/munged.log" --seed-file="$STATE_DIR/munge/munged.seed"
    wait_for "$START_TIMEOUT_S" test -S "$MUNGE_SOCKET" ||
        die "munged did not create $MUNGE_SOCKET (see $STATE_DIR/log/munged*)"

    write_conf
    export SLURM_CONF="$CONF"
    # -c: start from a clean job state; -i: ignore state files from an earlier run.
    start_daemon slurmctld slurmctld -D -c -i -f "$CONF"
    wait_for "$START_TIMEOUT_S" scontrol ping ||
        die "slurmctld did not answer 'scontrol ping' (see $STATE_DIR/log/slurmctld.*)"
    start_daemon slurmd slurmd -D -f "$CONF" -N "$NODE_NAME"
    # The node is usable once sinfo lists it idle (or mixed/allocated if jobs are already queued).
    wait_for "$START_TIMEOUT_S" bash -c "sinfo -h -N -o %t | grep -Eq '^(idle|mix|alloc)'" ||
        die "node $NODE_NAME did not come up (sinfo: $(sinfo -h -N -o '%t %E' 2>&1); see $STATE_DIR/log/slurmd.*)"
    say "cluster is up: $(sinfo -h -o '%P %a %D %c %t' | head -1)"
    say "use it from this shell with:  eval \"\$($0 env)\""
    cluster_env
}

cmd_stop() {
    export PATH="$PATH:/usr/sbin:/sbin"
    if daemon_running slurmctld; then
        local jobs
        jobs="$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)"
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
            wait_for 20 bash -c "[ -z \"\$(SLURM_CONF=$CONF squeue -h -t R,CG -o %i)\" ]" ||
                say "jobs still running after 20 s; stopping anyway"
        fi
    fi
    for name in slurmd slurmctld munged; do
        local pid
        pid="$(pid_of "$name")"
        if is_our_pid "$pid" "$name"; then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 10))
            while is_our_pid "$pid" "$name" && ((SECONDS < deadline)); do sleep 0.2; done
            if is_our_pid "$pid" "$name"; then
                say "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        elif [ -n "$pid" ]; then
            say "$name (pid $pid) is not running"
        fi
        rm -f "$STATE_DIR/pids/$name.pid"
    done
    say "stopped (state and logs kept in $STATE_DIR)"
}

cmd_status() {
    export PATH="$PATH:/usr/sbin:/sbin"
    local up=0
    for name in munged slurmctld slurmd; do
        if daemon_running "$name"; then
            echo "$name: running (pid $(pid_of "$name"))"
            up=$((up + 1))
        else
            echo "$name: not running"
        fi
    done
    if [ "$up" -eq 3 ]; then
        SLURM_CONF="$CONF" sinfo
        SLURM_CONF="$CONF" squeue
        return 0
    fi
    return 1
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cluster_env ;;
*)
    echo "usage: $0 start|stop|status|env   (state dir: $STATE_DIR; see the header of this script)" >&2
    exit 2
    ;;
esac
