#!/usr/bin/env bash
# Stop what scripts/slurm-up.sh started (the names it recorded), each by its PID file, in the
# reverse order, and wait until each has exited. Daemons it did not start are left alone.
# Idempotent: nothing recorded, nothing to do. Installed packages and job state stay.
set -euo pipefail

RECORD=/run/agnostic-sam-slurm.started
declare -A PIDFILE=([munged]=/run/munge/munged.pid [mariadbd]=/run/mysqld/mysqld.pid
                    [slurmdbd]=/run/slurmdbd.pid [slurmctld]=/run/slurmctld.pid
                    [slurmd]=/run/slurmd.pid)

say() { echo "slurm-down: $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm-down: error: run as root: sudo $0" >&2; exit 1; }
if [ ! -s "$RECORD" ]; then
  say "nothing to stop (no daemons recorded by slurm-up in $RECORD)"
  exit 0
fi

alive() {  # alive PID NAME: PID is a process named NAME and not a zombie (an exited daemon
  # whose parent, e.g. a container's init, does not reap it)
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] &&
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop() {  # stop NAME: SIGTERM the PID in its PID file if it is that daemon; wait up to 20 s
  local pid i
  pid=$(cat "${PIDFILE[$1]}" 2>/dev/null) || { say "$1: no PID file"; return 0; }
  if [ -z "$pid" ] || ! alive "$pid" "$1"; then
    say "$1: not running"
    return 0
  fi
  kill "$pid"
  for i in $(seq 200); do
    alive "$pid" "$1" || { say "stopped $1 (pid $pid)"; return 0; }
    sleep 0.1
  done
  say "$1 (pid $pid) did not stop in 20 s: killing it"
  kill -9 "$pid" 2>/dev/null || true
}

for name in slurmd slurmctld slurmdbd mariadbd munged; do
  grep -qx "$name" "$RECORD" && stop "$name"
done
rm -f "$RECORD"
