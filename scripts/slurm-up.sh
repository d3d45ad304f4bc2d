#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine, for `pytest -m slurm` and for trying
# `--launcher slurm` by hand: munged, MariaDB + slurmdbd (so `sacct` works: without it submitit
# cannot see a cancelled job), slurmctld and slurmd, started as root without systemd or cgroups.
# Idempotent: installs the Debian packages only when missing, starts only what is not running,
# and ends when a job has run (`srun true`). `scripts/slurm-down.sh` stops what this started
# (the names are recorded in $RECORD, each daemon's PID in its PID file).
# Debian 12 / slurm-wlm 22.05; measured on 2 cores: ~40 s from nothing, ~2 s when installed.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CONF=/etc/slurm
LOGS=/var/log/slurm
RECORD=/run/agnostic-sam-slurm.started  # daemons this script started, one name a line
DB_PASS=slurmpw                         # a local, socket-only database: not a secret
# name -> PID file (the daemons write them; mariadbd writes the one given on its command line)
declare -A PIDFILE=([munged]=/run/munge/munged.pid [mariadbd]=/run/mysqld/mysqld.pid
                    [slurmdbd]=/run/slurmdbd.pid [slurmctld]=/run/slurmctld.pid
                    [slurmd]=/run/slurmd.pid)

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons): sudo $0"

running() {  # running NAME: its PID file names a live process of that name (not a zombie)
  local pid
  pid=$(cat "${PIDFILE[$1]}" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] &&
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD every 0.1 s
  local limit=$(( $1 * 10 )) what=$2 i=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    i=$(( i + 1 ))
    [ "$i" -le "$limit" ] || die "timed out waiting for $what (logs in $LOGS)"
    sleep 0.1
  done
}

started() {  # started NAME: record that this script started it (for slurm-down)
  grep -qx "$1" "$RECORD" 2>/dev/null || echo "$1" >> "$RECORD"
  say "started $1 (pid $(cat "${PIDFILE[$1]}"))"
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the packages' postinst cannot start daemons without an init system: that is expected
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_if_changed() {  # write_if_changed FILE MODE < content; returns 0 when it changed
  local new
  new=$(cat)
  if [ -f "$1" ] && [ "$(cat "$1")" = "$new" ]; then return 1; fi
  printf '%s\n' "$new" > "$1"
  chmod "$2" "$1"
  return 0
}

slurm_conf() {  # this host's name, CPUs and 90 % of its memory (MB)
  local host ncpu mem
  host=$(hostname -s)
  ncpu=$(nproc)
  mem=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cat <<CONF
# Written by agnostic-sam's scripts/slurm-up.sh: a one-node cluster for tests.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# a requeued job becomes eligible after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,batch_sched_delay=0,sched_min_interval=0
MessageTimeout=10
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=300
KillWait=2
InactiveLimit=0
Waittime=0
NodeName=$host CPUs=$ncpu RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

slurmdbd_conf() {
  cat <<CONF
# Written by agnostic-sam's scripts/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
DebugLevel=info
LogFile=$LOGS/slurmdbd.log
PidFile=${PIDFILE[slurmdbd]}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
}

start_munge() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --force
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  if ! running munged; then
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged running munged
    started munged
  fi
  munge -n | unmunge >/dev/null || die "munge cannot decode its own credential"
}

start_database() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  if ! running mariadbd; then
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      --pid-file="${PIDFILE[mariadbd]}" >"$LOGS/mariadb.log" 2>&1 </dev/null &
    wait_for 30 MariaDB mysqladmin ping
    wait_for 10 "MariaDB's PID file" running mariadbd
    started mariadbd
  fi
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  if ! running slurmdbd; then
    /usr/sbin/slurmdbd  # forks into the background
    wait_for 30 slurmdbd sacctmgr -n list cluster
    started slurmdbd
  fi
}

start_slurm() {  # $1 = 1 when slurm.conf changed: running daemons must read it again
  local name
  if [ "$1" = 1 ]; then
    for name in slurmd slurmctld; do
      if running "$name"; then
        kill "$(cat "${PIDFILE[$name]}")"
        for _ in $(seq 150); do running "$name" || break; sleep 0.1; done
        ! running "$name" || die "$name did not stop after SIGTERM"
      fi
    done
  fi
  for name in slurmctld slurmd; do
    if ! running "$name"; then
      "/usr/sbin/$name"  # forks into the background
      wait_for 15 "$name" running "$name"
      started "$name"
    fi
  done
  # sinfo can say idle before slurmd has registered: a job that runs is the real check
  wait_for 30 "the node to be idle" bash -c '[ "$(sinfo -h -o %T)" = idle ]'
  timeout 60 srun --time=1 --quiet true || die "a test job (srun true) did not run"
}

main() {
  local t0=$SECONDS changed=0
  install_packages
  mkdir -p "$CONF" /var/spool/slurmctld /var/spool/slurmd "$LOGS"
  write_if_changed "$CONF/slurm.conf" 644 < <(slurm_conf) && changed=1
  write_if_changed "$CONF/slurmdbd.conf" 600 < <(slurmdbd_conf) || true
  start_munge
  start_database
  start_slurm "$changed"
  say "cluster up in $(( SECONDS - t0 )) s: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T')"
}

main "$@"
