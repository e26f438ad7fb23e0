#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (Debian 12, slurm 22.05), for CI and for trying
# the pipeline's SLURM profile (profiles/slurm) locally:
#
#   munged -> MariaDB -> slurmdbd (job accounting: the snakemake SLURM executor polls job states with
#   `sacct`) -> slurmctld + slurmd on loopback, one node with this machine's CPUs and memory,
#   partition "$SLURM_CI_PARTITION" (default "ci"), account "$SLURM_CI_ACCOUNT" (default "tess") for root.
#
# Usage (as root, no systemd needed):  bash .ci/slurm_setup.sh          # install if needed, start, check
#                                      bash .ci/slurm_setup.sh --stop   # stop the daemons it started
# Idempotent: when the cluster already answers (node idle, `srun` and `sacct` work) it only re-checks.
# Everything it writes lives in /etc/slurm, /etc/munge, /var/lib/slurm-ci, /var/log/slurm-ci.
set -euo pipefail

PARTITION=${SLURM_CI_PARTITION:-ci}
ACCOUNT=${SLURM_CI_ACCOUNT:-tess}
CLUSTER=${SLURM_CI_CLUSTER:-tessci}
DB_PASS=${SLURM_CI_DB_PASS:-slurmci}   # loopback-only throwaway database
STATE=/var/lib/slurm-ci
LOGS=/var/log/slurm-ci
RUN=/run/slurm-ci
NODE=$(hostname -s)
T0=$(date +%s)

say() { echo "== slurm_setup [$(( $(date +%s) - T0 ))s]: $*"; }
die() {
  echo "slurm_setup ERROR: $*" >&2
  for f in "$LOGS"/*.log; do
    [ -s "$f" ] && { echo "---- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}
# wait_for <seconds> <description> <command...>: poll until the command succeeds
wait_for() {
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 2))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "timed out after ${secs}s waiting for $what (command: $*)"
}
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop one daemon we started, by the pid in its pidfile
  local pf=$1
  if pid_alive "$pf"; then
    local pid; pid=$(cat "$pf"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pf"
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages and starts system daemons)"

if [ "${1:-}" = "--stop" ]; then
  for d in slurmd slurmctld slurmdbd munged; do stop_pidfile "$RUN/$d.pid"; done
  [ -x /etc/init.d/mariadb ] && service mariadb stop >/dev/null 2>&1 || true
  say "stopped"; exit 0
fi

cluster_ok() {
  timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)' &&
    timeout 10 sacct -n -X -S now-1minute >/dev/null 2>&1 &&
    timeout 30 srun -p "$PARTITION" -A "$ACCOUNT" -t 1 --mem 10 -n 1 hostname >/dev/null 2>&1
}
if command -v sinfo >/dev/null 2>&1 && pid_alive "$RUN/slurmctld.pid" && cluster_ok; then
  say "cluster already running: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB partition=%P')"
  exit 0
fi

# ---- 1. packages --------------------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # do not let the packages start their daemons with Debian's default configs (no systemd here anyway)
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_added=1; fi
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/slurm_setup_apt.log 2>&1 ||
    { tail -n 30 /tmp/slurm_setup_apt.log >&2; die "apt-get install ${missing[*]} failed"; }
  [ $policy_added = 1 ] && rm -f /usr/sbin/policy-rc.d
  say "packages installed"
fi
say "$(slurmctld -V)"

# ---- 2. stop whatever an earlier run of this script left behind ----------------------------------------
mkdir -p "$STATE"/{slurmctld,slurmd} "$LOGS" "$RUN" /etc/slurm
for d in slurmd slurmctld slurmdbd; do stop_pidfile "$RUN/$d.pid"; done

# ---- 3. configs -----------------------------------------------------------------------------------------
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB * 3 / 4 ))   # leave room for the daemons and the OS
cat >/etc/slurm/slurm.conf <<EOF
# written by .ci/slurm_setup.sh: single-node test cluster on loopback
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat >/etc/slurm/slurmdbd.conf <<EOF
# written by .ci/slurm_setup.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 /etc/slurm/slurmdbd.conf

# ---- 4. munge -------------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key;
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  rm -f /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid ||
    die "munged failed to start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$RUN/munged.pid" 2>/dev/null || true
  wait_for 20 "munged" sh -c 'munge -n | unmunge'
fi

# ---- 5. MariaDB + slurmdbd ------------------------------------------------------------------------------
if ! mysqladmin ping >/dev/null 2>&1; then
  say "starting MariaDB"
  service mariadb start >"$LOGS/mariadb-start.log" 2>&1 || die "MariaDB failed to start: $(cat "$LOGS/mariadb-start.log")"
  wait_for 60 "MariaDB" mysqladmin ping
fi
mysql -u root <<EOF || die "could not create the slurm accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
say "starting slurmdbd"
slurmdbd || die "slurmdbd failed to start"
wait_for 60 "slurmdbd (sacctmgr)" sacctmgr -n list cluster

# cluster, account and root's association must exist before slurmctld enforces associations
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -n list account format=account | grep -qw "$ACCOUNT" ||
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="pipeline CI" organization=ci >/dev/null
sacctmgr -n list assoc user=root account="$ACCOUNT" format=user | grep -qw root ||
  sacctmgr -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER" >/dev/null
sacctmgr -n list assoc user=root account="$ACCOUNT" format=user | grep -qw root || die "sacctmgr: no association root/$ACCOUNT"

# ---- 6. slurmctld + slurmd ------------------------------------------------------------------------------
say "starting slurmctld and slurmd (node $NODE: CPUs=$CPUS RealMemory=${REAL_MEM}MB, partition $PARTITION)"
slurmctld || die "slurmctld failed to start"
wait_for 30 "slurmctld (scontrol ping)" sh -c 'scontrol ping | grep -q UP'
slurmd -N "$NODE" || die "slurmd failed to start"
node_ready() { sinfo -h -N -n "$NODE" -o '%T' | grep -Eq '^(idle|mixed|allocated)$'; }
for _ in $(seq 1 60); do
  node_ready && break
  # a node left DOWN/DRAINED by an earlier run: bring it back
  sinfo -h -N -n "$NODE" -o '%T' | grep -Eq 'down|drain' && scontrol update nodename="$NODE" state=resume 2>/dev/null || true
  sleep 0.5
done
node_ready || die "node $NODE not idle: $(sinfo -N -l 2>&1)"

# ---- 7. smoke test: a job step through the scheduler, and its accounting record --------------------------
out=$(timeout 60 srun -p "$PARTITION" -A "$ACCOUNT" -t 1 --mem 10 -n 1 -J slurm_setup_check hostname 2>&1) ||
  die "srun hostname failed: $out"
wait_for 30 "the check job in sacct" sh -c "sacct -n -X -S now-10minutes --name slurm_setup_check -o state | grep -q COMPLETED"
say "cluster up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB partition=%P'); srun ran on '$out'; sacct works"
