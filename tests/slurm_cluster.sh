#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for tests and for trying launch.slurm.
#
#   tests/slurm_cluster.sh up DIR     install the Debian packages when missing, configure a
#                                     cluster under DIR, start munged, slurmctld and slurmd,
#                                     wait until the node is idle; prints `export SLURM_CONF=...`
#   tests/slurm_cluster.sh down DIR   cancel its jobs and stop its daemons (DIR keeps the logs)
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
        --seed-file="$dir/munge/munged.seed" || die "munged did not start; see $dir/log/munged.log"
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -f "$SLURM_CONF" -N "$(hostname -s)" || die "slurmd did not start; see $dir/log/slurmd.log"
    local state=
    for _ in $(seq 150); do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        [[ $state == idle ]] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.2
    done
    die "the node did not become idle in 30 s (state: '${state:-no answer}'); logs in $dir/log"
}

stop_pidfile() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
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
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

case "${1:-}:${2:-}" in
    up:?*) up "$(realpath -m "$2")" ;;
    down:?*) down "$(realpath -m "$2")" ;;
    *) die "usage: $0 up|down DIR" ;;
esac
