#!/usr/bin/env bash
# A throwaway one-node SLURM cluster (munged + slurmctld + slurmd) for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh start DIR   install SLURM if missing, start the daemons, wait until idle
#   tests/slurm/cluster.sh stop DIR    stop the daemons started from DIR, by their PID files
#
# The config, munge key and socket, state, logs and PID files live in DIR. Jobs go to partition
# "actsparse", which is not the default: the default partition "closed" refuses jobs, so a job
# only runs if its submitter named the partition. Exit status 3: this machine cannot install SLURM.
set -euo pipefail

readonly PARTITION=actsparse
readonly NODE_MEMORY_MB=262144
# The plugin's job step drops SLURM_CONF before its inner srun, so the config must also be found
# where every SLURM command looks by default.
readonly SYSTEM_CONF=/etc/slurm/slurm.conf
readonly CANNOT_INSTALL=3

die() { echo "cluster.sh: $1" >&2; exit "${2:-1}"; }

# The PID in a PID file, if that process is still one of ours: every daemon's command line names
# DIR, which guards against killing an unrelated process that reused a stale PID.
our_pid() {
    local pidfile=$1 dir=$2 pid cmdline
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ $cmdline == *"$dir"* ]] && echo "$pid"
}

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get" "$CANNOT_INSTALL"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# munged runs as the munge user, refuses keys others can read, and needs a socket directory that
# everyone can traverse: hence munge/ owned by munge, 0755, inside a DIR the munge user can reach.
start_munge() {
    local dir=$1
    runuser -u munge -- test -x "$dir" || die "the munge user cannot reach $dir (check its parents' modes)"
    install -d -o munge -g munge -m 0755 "$dir/munge"
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chown munge:munge "$dir/munge/munge.key"
    chmod 0400 "$dir/munge/munge.key"
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

# CR_Core_Memory makes --mem requests count, as on a real cluster. The node claims NODE_MEMORY_MB
# (config_overrides keeps slurmd from draining it for having less) so that the SLURM profile's
# requests, sized for real models, fit unchanged. MinJobAge keeps finished jobs visible to squeue,
# which is how a workflow without slurmdbd learns that its jobs finished. linuxproc and task/none
# track jobs without cgroups, so there is no cgroup.conf.
write_config() {
    local dir=$1 node
    node=$(slurmd -C | head -1 | sed "s/RealMemory=[0-9]*/RealMemory=$NODE_MEMORY_MB/")
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=actsparse-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=300
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=closed Nodes=ALL Default=YES State=DRAIN
PartitionName=$PARTITION Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
}

# Never overwrites a machine's own SLURM config; a dangling link (a run killed before stop) is
# nobody's. stop removes only the link that start made.
link_system_conf() {
    local dir=$1
    [[ -L $SYSTEM_CONF && ! -e $SYSTEM_CONF ]] && rm "$SYSTEM_CONF"
    [[ -e $SYSTEM_CONF ]] && die "$SYSTEM_CONF exists: this machine has its own SLURM"
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$dir/slurm.conf" "$SYSTEM_CONF"
}

wait_until_idle() {
    local dir=$1
    for _ in $(seq 100); do
        [[ $(sinfo -h -p "$PARTITION" -o %T 2>/dev/null) == idle ]] && return
        sleep 0.2
    done
    tail -n 20 "$dir"/*.log >&2 || true
    die "the node did not become idle within 20 s; logs are in $dir"
}

start() {
    local dir=$1
    [[ $(id -u) -eq 0 ]] || die "installing and starting SLURM needs root" "$CANNOT_INSTALL"
    install_slurm
    our_pid "$dir/munge/munged.pid" "$dir" >/dev/null && die "the cluster in $dir is running; stop it first"
    mkdir -p "$dir"
    chmod 0755 "$dir"
    start_munge "$dir"
    write_config "$dir"
    link_system_conf "$dir"
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf"
    wait_until_idle "$dir"
    echo "cluster up: partition $PARTITION, config $dir/slurm.conf"
}

# slurmd, then slurmctld, then munged, which both still use while they shut down.
stop() {
    local dir=$1 pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        pid=$(our_pid "$pidfile" "$dir") || continue
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    [[ $(readlink "$SYSTEM_CONF" 2>/dev/null) == "$dir/slurm.conf" ]] && rm "$SYSTEM_CONF"
    return 0
}

[[ $# -eq 2 && ( $1 == start || $1 == stop ) ]] || die "usage: $0 start|stop DIR" 2
"$1" "$(realpath -m "$2")"
