#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for tests and for trying launch.slurm.
#
#   tests/helpers/slurm_cluster.sh up DIR     install the Debian packages when missing, configure a
#                                     cluster under DIR, start munged, slurmctld and slurmd,
#                                     wait until the node is idle; prints `export SLURM_CONF=...`
#   tests/helpers/slurm_cluster.sh down DIR   cancel its jobs and stop its daemons (DIR keeps the logs)
#
# Needs root (slurmd launches the jobs). No systemd and no cgroups: proctrack/linuxproc,
# task/none; private munge socket, free ports, one partition `debug` with every core of the
# machine. Requeued jobs restart within ~15 s (short credential lifetime, fast backfill).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
PARTITION=debug

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

install_packages() {
    local missing=0 tool
    for tool in slurmctld slurmd sbatch munged mungekey; do
        command -v "$tool" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "SLURM is missing and this is not a Debian machine; install ${PACKAGES[*]}"
    ((EUID == 0)) || die "SLURM is missing; install it as root: apt-get install -y ${PACKAGES[*]}"
    echo "slurm_cluster.sh: installing ${PACKAGES[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null; } ||
        die "apt-get could not install ${PACKAGES[*]}"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_config() {
    local dir=$1 host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 700 "$dir" "$dir/munge"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=rotalibi-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=3600
# Job ids set training's MASTER_PORT (20000 + id % 20000): two test clusters side by side must
# not both start at job 1.
FirstJobId=$((RANDOM % 19000 + 1000))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    local dir=$1
    ((EUID == 0)) || die "the test cluster needs root (slurmd launches jobs as their owner)"
    install_packages
    [[ -e $dir/slurm.conf ]] && die "$dir already holds a cluster; run '$0 down $dir' or pick a new directory"
    write_config "$dir"
    export SLURM_CONF=$dir/slurm.conf
    mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 ||
        die "mungekey could not create $dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" || fail "$dir" "munged did not start"
    slurmctld -f "$SLURM_CONF" || fail "$dir" "slurmctld did not start"
    slurmd -f "$SLURM_CONF" -N "$(hostname -s)" || fail "$dir" "slurmd did not start"
    local state=
    for _ in $(seq 150); do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        [[ $state == idle ]] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.2
    done
    fail "$dir" "the node did not become idle in 30 s (state: '${state:-no answer}')"
}

fail() {  # fail DIR MESSAGE: stop what `up` started, then stop with the message
    stop_daemons "$1" "$1/slurmd.pid" "$1/slurmctld.pid" "$1/munge/munged.pid"
    die "$2; logs in $1/log"
}

stop_daemons() {  # stop_daemons DIR PIDFILE...: SIGTERM, then SIGKILL to any up after 10 s
    local dir=$1 pidfile pid pids=()
    for pidfile in "${@:2}"; do
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        # Only a process started for this cluster (a stale pid file may name another one).
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/" || continue
        kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 50); do
        any_alive "${pids[@]}" || return 0
        sleep 0.2
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

any_alive() {  # a process that exited but was not reaped (a zombie) counts as gone
    local pid state
    for pid in "$@"; do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) && [[ $state != Z ]] && return 0
    done
    return 1
}

down() {
    local dir=$1
    [[ -e $dir/slurm.conf ]] || die "$dir holds no cluster"
    export SLURM_CONF=$dir/slurm.conf
    if squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null; then
        for _ in $(seq 100); do  # let slurmd end the jobs' processes
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop_daemons "$dir" "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"
}

case "${1:-}:${2:-}" in
    up:?*) up "$(realpath -m "$2")" ;;
    down:?*) down "$(realpath -m "$2")" ;;
    *) die "usage: $0 up|down DIR" ;;
esac
