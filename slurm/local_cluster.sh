#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine: one slurmctld and two slurmd "nodes" (n1, n2),
# to try the batch scripts before a real cluster (and for our tests). Debian/Ubuntu, as root.
#
#   bash slurm/local_cluster.sh start      # installs slurm + munge with apt if missing
#   export SLURM_CONF=/tmp/pipeline-slurm/slurm.conf   (start prints this line)
#   sbatch --nodes 2 --ntasks-per-node 2 slurm/train.sbatch configs/mnist32.yaml train.device=cpu
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh stop
#
# Environment: PIPELINE_SLURM_DIR (state, logs, config; default /tmp/pipeline-slurm),
# PIPELINE_SLURM_PORT (slurmctld port; the nodes use the next two; default 16817),
# PIPELINE_SLURM_CPUS (CPUs each node offers; default: this machine's count).
# Both nodes are this machine (NodeAddr 127.0.0.1): their CPUs are the same cores, offered twice.
set -euo pipefail
dir="${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}"
port="${PIPELINE_SLURM_PORT:-16817}"
cpus="${PIPELINE_SLURM_CPUS:-$(nproc)}"
export SLURM_CONF="$dir/slurm.conf"

die() { echo "local_cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurmctld/slurmd/munge are not installed and this is not root: apt-get install -y slurmctld slurmd slurm-client munge"
    echo "local_cluster: installing slurmctld slurmd slurm-client munge (apt)"
    timeout 300 apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
}

write_config() {
    local host memory
    host="$(hostname -s)"
    # RealMemory must not exceed what slurmd -C reports; each node claims a quarter.
    memory=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') / 4 ))
    mkdir -p "$dir/state" "$dir/log" "$dir/spool"
    cat > "$SLURM_CONF" <<EOF
ClusterName=pipeline-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=15
MinJobAge=600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus RealMemory=$memory State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null \
        && die "a cluster already runs from $dir (stop it first)"
    install_packages
    start_munge
    write_config
    slurmctld -i || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -N n1 || die "slurmd n1 did not start; see $dir/log/slurmd-n1.log"
    slurmd -N n2 || die "slurmd n2 did not start; see $dir/log/slurmd-n2.log"
    for _ in $(seq 60); do  # bounded: 30 s
        if [ "$(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle')" = 2 ]; then
            echo "local_cluster: 2 nodes idle (n1, n2) in partition 'local'; state in $dir"
            echo "export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.5
    done
    timeout 5 sinfo -N >&2 || true
    die "nodes did not become idle within 30 s; see $dir/log/"
}

stop() {
    for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for _ in $(seq 30); do  # bounded: 15 s, then SIGKILL
        alive=0
        for pidfile in "$dir"/*.pid; do
            [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for pidfile in "$dir"/*.pid; do
        [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$dir"
    echo "local_cluster: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) timeout 5 sinfo -N && timeout 5 squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
