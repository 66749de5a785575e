#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py (pytest -m slurm) and for trying
# profiles/slurm by hand. Needs root and Debian's slurm-wlm and munge packages, which only `install` installs.
#
#   profiles/slurm/testcluster.sh install  # apt-get install slurm-wlm munge, quiet and noninteractive, unless installed
#   profiles/slurm/testcluster.sh start    # idempotent: starts whichever of munged, slurmctld, slurmd is not running
#   profiles/slurm/testcluster.sh status   # the daemons' pids; exit status 0 when all three run
#   profiles/slurm/testcluster.sh env      # prints `export SLURM_CONF=...`: eval "$(profiles/slurm/testcluster.sh env)"
#   profiles/slurm/testcluster.sh stop     # cancels the cluster's jobs, then ends exactly the pids it started
#
# Everything lives in $KVPIPE_SLURM_DIR (default /tmp/kvpipe-slurm): slurm.conf, a munge key and socket of its own,
# state, logs and pid files. Client commands (sbatch, squeue, scancel) find the cluster through SLURM_CONF; the one
# thing outside that directory is a symlink /etc/slurm/slurm.conf to its slurm.conf, made by start (only where no
# such file exists) and removed by stop: Snakemake's slurm-jobstep plugin drops SLURM_CONF from a job's environment,
# so the `srun` that runs each job step reads SLURM's default path, as on a real cluster.
# The node is `hostname -s` with the CPUs and memory `slurmd -C` reports; partitions `cpu` (default) and `gpu` both
# hold it. No slurmdbd: no sacct, so Snakemake's plugin must poll with squeue (MinJobAge keeps finished jobs there
# for 30 minutes). Ports: $KVPIPE_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail

DIR=${KVPIPE_SLURM_DIR:-/tmp/kvpipe-slurm}
PORT=${KVPIPE_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
SYSTEM_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
DAEMONS=(munged slurmctld slurmd)
export SLURM_CONF=$CONF

die() {
    echo "testcluster: $*" >&2
    exit 1
}

pidfile() {
    case $1 in
    munged) echo "$MUNGE_DIR/munged.pid" ;; # written by munged itself, as the munge user
    *) echo "$DIR/$1.pid" ;;
    esac
}

# The recorded pid of a daemon, if that process still runs and is that daemon (not a reused pid).
running_pid() {
    local file pid
    file=$(pidfile "$1")
    [[ -s $file ]] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$1" ]] || return 1
    echo "$pid"
}

wait_for() { # wait_for SECONDS WHAT COMMAND...: poll COMMAND every half second
    local seconds=$1 what=$2
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what not ready after ${seconds}s (logs under $DIR)"
}

munge_works() { munge -S "$SOCKET" -n </dev/null | unmunge -S "$SOCKET"; }
controller_answers() { scontrol ping | grep -q "is UP"; }
node_ready() { [[ $(sinfo -h -n "$NODE" -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]; }

write_config() {
    local node_line
    node_line=$(slurmd -C | head -n 1) # NodeName=<host> CPUs=... RealMemory=...
    [[ $node_line == NodeName=* ]] || die "slurmd -C printed no node line: $node_line"
    node_line="NodeName=$NODE ${node_line#NodeName=* }"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
# Written by profiles/slurm/testcluster.sh: a single-node test cluster run as root.
ClusterName=kvpipe-test
SlurmctldHost=$NODE
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=1800
SchedulerParameters=sched_interval=2
$node_line State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# /etc/slurm/slurm.conf -> this cluster's slurm.conf; never replaces a file, nor a link to a conf that exists.
link_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        return 0
    fi
    if [[ -e $SYSTEM_CONF ]]; then
        die "$SYSTEM_CONF exists and is not this test cluster's (a real cluster, or another test cluster running): stop it first"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF" # a link left dangling by a test cluster that is gone is replaced
}

start_munged() {
    running_pid munged >/dev/null && return 0
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR" # clients reach the socket through it
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chown munge:munge "$MUNGE_DIR/munge.key"
        chmod 0400 "$MUNGE_DIR/munge.key"
    fi
    runuser -u munge -- test -x "$MUNGE_DIR" || die "the munge user cannot reach $MUNGE_DIR: choose a KVPIPE_SLURM_DIR whose parents all may"
    rm -f "$SOCKET" "$SOCKET.lock"
    runuser -u munge -- munged --key-file="$MUNGE_DIR/munge.key" --socket="$SOCKET" \
        --pid-file="$(pidfile munged)" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
        die "munged failed to start (see $MUNGE_DIR/munged.log)"
    wait_for 20 munged munge_works
}

missing() { # what start needs and the machine lacks, space-separated
    local missing=()
    for tool in munged munge unmunge slurmctld slurmd sinfo scontrol squeue scancel sbatch runuser; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    getent passwd munge >/dev/null || missing+=("the munge user")
    echo "${missing[*]}"
}

install_packages() {
    [[ -n $(missing) ]] || return 0
    [[ $(id -u) == 0 ]] || die "not root: SLURM and munge not installed (the SLURM tests will be skipped)"
    command -v apt-get >/dev/null || die "no apt-get: install SLURM and munge with your system's packages"
    local apt=(apt-get install -y -qq -o Dpkg::Use-Pty=0 slurm-wlm munge)
    # the package lists first if the install fails without them
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null 2>&1; } ||
        die "apt-get install slurm-wlm munge failed (the SLURM tests will be skipped)"
    echo "testcluster: installed slurm-wlm and munge"
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it starts munged as the munge user and the SLURM daemons as root)"
    local lacking
    lacking=$(missing)
    [[ -z $lacking ]] || die "missing $lacking: install SLURM and munge first ($0 install)"
    mkdir -p "$DIR"
    chmod 0755 "$DIR" # munged, as the munge user, serves its socket from under it
    link_system_conf
    start_munged
    if ! running_pid slurmctld >/dev/null; then
        write_config # only while the controller is down: a running cluster keeps the config it started with
        slurmctld -f "$CONF" || die "slurmctld failed to start (see $DIR/slurmctld.log)"
    fi
    wait_for 30 slurmctld controller_answers
    if ! running_pid slurmd >/dev/null; then
        slurmd -f "$CONF" -N "$NODE" || die "slurmd failed to start (see $DIR/slurmd.log)"
    fi
    wait_for 60 "node $NODE" node_ready
    status
}

status() {
    local pid all=0
    for daemon in "${DAEMONS[@]}"; do
        if pid=$(running_pid "$daemon"); then
            echo "$daemon: running, pid $pid"
        else
            echo "$daemon: not running"
            all=1
        fi
    done
    echo "SLURM_CONF=$CONF"
    return $all
}

stop_daemon() {
    local pid
    pid=$(running_pid "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.25
    done
    if [[ -d /proc/$pid ]]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$1")"
    echo "$1: stopped (pid $pid)"
}

stop() {
    if running_pid slurmctld >/dev/null && [[ -f $CONF ]]; then # (SLURM's clients wait a minute for a missing conf)
        # the cluster's jobs first, so that no job step outlives slurmd
        local jobs
        jobs=$(timeout 30 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            timeout 30 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [[ -z $(timeout 30 squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
                sleep 0.25
            done
        fi
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

case ${1:-} in
install) install_packages ;;
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 {install|start|stop|status|env}" >&2
    exit 2
    ;;
esac
