#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and CI (root, no systemd needed).
#
#   slurm_cluster.sh install   apt-get install the Debian packages (slurmctld slurmd slurm-client munge)
#   slurm_cluster.sh start     write /etc/slurm/slurm.conf, start munged, slurmctld and slurmd; wait for the node
#   slurm_cluster.sh stop      stop the three daemons by their PID files; remove the configuration
#   slurm_cluster.sh status    exit 0 if the cluster answers (sinfo), 1 otherwise
#   slurm_cluster.sh up        install (if needed) + start: what CI calls
#
# Measured pitfalls this script handles: munged must run as the `munge` user; the slurm executor
# plugin strips SLURM_CONF from a job's environment before it calls srun, so the configuration must
# live at the default /etc/slurm/slurm.conf; there is no accounting database (accounting_storage/none),
# so `sacct` cannot answer: use the profile's squeue status polling. Finished jobs are recorded by
# the controller in $STATE/jobcomp.log (jobcomp/filetxt), which the tests read.
#
# Environment: SLURM_TEST_STATE (state, logs and PID files; default /var/tmp/unisparse-slurm),
# SLURM_TEST_MEM_MB (memory the node offers; default: what `slurmd -C` reports, minus 512 MB).
# The script refuses to overwrite an /etc/slurm/slurm.conf it did not write (a real cluster's).
set -euo pipefail

STATE="${SLURM_TEST_STATE:-/var/tmp/unisparse-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by unisparse workflow/scripts/slurm_cluster.sh"
MUNGE_PID="$STATE/munged.pid"
MUNGE_SOCKET=/run/munge/munge.socket.2

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it starts system daemons)"; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; }

do_install() {
  need_root
  if installed; then return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  installed || die "installation finished but the SLURM/munge binaries are missing"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's configuration"
  fi
  local node cpus mem
  node="$(hostname -s)"
  cpus="$(nproc)"
  mem="${SLURM_TEST_MEM_MB:-$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1) - 512 ))}"
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
  cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=unisparse
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if alive "$MUNGE_PID"; then return 0; fi
  if [ -S "$MUNGE_SOCKET" ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged we did not start is already serving (e.g. the system's): use it
  fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  # munged refuses to run as root; it forks and writes its PID file itself
  touch "$MUNGE_PID"; chown munge:munge "$MUNGE_PID"
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$MUNGE_PID --force"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not come up"
}

do_start() {
  need_root
  installed || die "SLURM is not installed: run '$0 install' first"
  mkdir -p "$STATE"; chmod 755 "$STATE"
  write_conf
  start_munge
  alive "$STATE/slurmctld.pid" || slurmctld
  alive "$STATE/slurmd.pid" || slurmd
  local node; node="$(hostname -s)"
  for _ in $(seq 120); do
    local st; st="$(sinfo -h -n "$node" -o %t 2>/dev/null || true)"
    case "$st" in
      idle*|mix*|alloc*) echo "slurm_cluster.sh: node $node is $st (state in $STATE)" >&2; return 0 ;;
      drain*|down*|inval*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  sinfo >&2 || true
  tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  die "the node did not become idle within 60 s"
}

stop_pid() {  # stop one daemon by its PID file, waiting until it is gone
  local f="$1"
  if alive "$f"; then
    local pid; pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

do_stop() {
  need_root
  stop_pid "$STATE/slurmd.pid"
  stop_pid "$STATE/slurmctld.pid"
  stop_pid "$MUNGE_PID"
  # without a controller, a left-behind configuration makes every SLURM client wait ~10 s for it,
  # and the slurm executor plugin runs `scontrol show config` whenever Snakemake starts
  if [ -e "$CONF" ] && grep -qF "$MARKER" "$CONF"; then rm -f "$CONF"; fi
}

do_status() { sinfo -h >/dev/null 2>&1; }

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  up) do_install; do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
