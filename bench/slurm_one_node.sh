#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying `advpipe generate --cluster slurm` (docs/CLUSTER.md)
# and for the test suite (tests/test_slurm.py). Debian/Ubuntu, as root.
#
#   bench/slurm_one_node.sh install   install munge, slurmctld, slurmd and slurm-client if missing (apt-get)
#   bench/slurm_one_node.sh start     install, write the munge key and slurm.conf, start munged, slurmctld and
#                                     slurmd, and wait until `sinfo` shows this node idle (idempotent: what
#                                     runs stays; a controller started afresh forgets earlier jobs)
#   bench/slurm_one_node.sh status    exit 0 when this script's cluster answers idle/mixed/allocated, else 1
#   bench/slurm_one_node.sh stop      cancel the partition's jobs, stop the daemons this script started
#
# One partition `debug` holding this host (its short name, at 127.0.0.1) with its cores and memory
# (RealMemory from `free`). No cgroups (proctrack/linuxproc, task/none), so it also runs in containers.
# Everything but the config lives under $ADVPIPE_SLURM_DIR (default /var/lib/advpipe-slurm): state,
# spool, pid files and logs. The config is /etc/slurm/slurm.conf, where sbatch, sinfo and dask-jobqueue
# find it; an existing slurm.conf that this script did not write is never replaced.
#
# Exit status: 0 done, 1 failed (the reason on stderr), 3 cannot run here (not root, no apt-get, no package).
set -euo pipefail

STATE="${ADVPIPE_SLURM_DIR:-/var/lib/advpipe-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by advpipe bench/slurm_one_node.sh"
PACKAGES=(munge slurmctld slurmd slurm-client)
NODE="$(hostname -s)"
# nproc honours OMP_NUM_THREADS, which test suites and job scripts often set to 1
CORES="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"

say() { echo "slurm_one_node: $*" >&2; }
cannot() { say "$*"; exit 3; }

installed() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v sinfo >/dev/null
}

install() {
    installed && return 0
    [[ $(id -u) -eq 0 ]] || cannot "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get to install it"
    say "installing ${PACKAGES[*]}"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
             >"/tmp/slurm_one_node-apt.log" 2>&1 \
           || { apt-get update -q >>"/tmp/slurm_one_node-apt.log" 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
                   >>"/tmp/slurm_one_node-apt.log" 2>&1; }; }; then
        cannot "apt-get could not install ${PACKAGES[*]}: $(tail -n 3 /tmp/slurm_one_node-apt.log | tr '\n' ' ')"
    fi
    installed || cannot "installed ${PACKAGES[*]} but munged/slurmctld/slurmd/sbatch are still not on PATH"
}

write_munge_key() {
    local key=/etc/munge/munge.key
    [[ -s $key ]] && return 0
    mkdir -p /etc/munge
    dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    chown munge:munge "$key"
    chmod 400 "$key"
}

write_conf() {
    if [[ -f $CONF ]] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        say "$CONF exists and was not written by this script; leaving it alone (stop its cluster and move it away" \
            "to use this one)"
        exit 1
    fi
    local memory
    memory="$(free -m | awk '/^Mem:/ {print $2}')"
    mkdir -p /etc/slurm "$STATE"/{ctld,spool,log,run}
    cat >"$CONF.tmp" <<EOF
$MARK
# A single-node cluster: this host ($NODE) is the controller and the only compute node.
ClusterName=advpipe
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SchedulerParameters=sched_interval=2
InactiveLimit=0
KillWait=5
MinJobAge=60
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CORES RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$CONF.tmp" "$CONF"; then
        rm -f "$CONF.tmp"
        return 0
    fi
    mv "$CONF.tmp" "$CONF"
    if running slurmctld; then  # a running cluster takes the new node size or partition at once
        scontrol reconfigure >/dev/null
    fi
}

running() {  # running NAME: the pid file names a live process
    local pidfile="$STATE/run/$1.pid"
    [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

start_daemons() {
    mkdir -p /run/munge "$STATE/run"
    chown munge:munge /run/munge
    if ! munge -n >/dev/null 2>&1 </dev/null; then
        runuser -u munge -- /usr/sbin/munged --force
        echo started >"$STATE/run/munged.ours"
    fi
    running slurmctld || slurmctld -c  # -c: a fresh start forgets jobs and node states of an earlier run
    running slurmd || slurmd
}

wait_idle() {
    local state="" i
    for i in $(seq 1 120); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated) return 0 ;;
            down*|drain*|inval*|fail*)
                # A node left down by an earlier run (e.g. after a reboot) comes back once its slurmd answers.
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    say "node $NODE is '${state:-not known to sinfo}' after 60 s, not idle; see $STATE/log/slurmctld.log and" \
        "$STATE/log/slurmd.log"
    tail -n 5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
}

start() {
    install
    [[ $(id -u) -eq 0 ]] || cannot "starting slurmd (SlurmdUser=root) needs root"
    write_munge_key
    write_conf
    start_daemons
    wait_idle
    say "node $NODE idle in partition debug ($CORES cores, $(free -m | awk '/^Mem:/ {print $2}') MB)"
}

status() {  # this script's cluster (its slurm.conf, its controller), answering
    [[ -f $CONF ]] && head -n 1 "$CONF" | grep -qF "$MARK" && running slurmctld || return 1
    case "$(node_state)" in
        idle|mixed|allocated) return 0 ;;
        *) return 1 ;;
    esac
}

stop_one() {  # stop_one NAME: TERM the process in NAME's pid file and wait for it to exit
    local pidfile="$STATE/run/$1.pid" pid i
    [[ -s $pidfile ]] || return 0
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    local i jobs
    if command -v scancel >/dev/null && running slurmctld; then
        timeout 10 scancel --partition=debug >/dev/null 2>&1 || true
        for i in $(seq 1 60); do  # let slurmd end the jobs' processes before it goes
            jobs="$(timeout 5 squeue -h -p debug -o %i 2>/dev/null)" || break
            [[ -z $jobs ]] && break
            sleep 0.25
        done
    fi
    stop_one slurmd
    stop_one slurmctld
    if [[ -f $STATE/run/munged.ours ]]; then
        local pid
        pid="$(cat /run/munge/munged.pid 2>/dev/null || true)"
        [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
        rm -f "$STATE/run/munged.ours"
    fi
}

case "${1:-start}" in
    install) install ;;
    start) start ;;
    status) status ;;
    stop) stop ;;
    *) say "usage: $0 [install|start|status|stop]"; exit 2 ;;
esac
