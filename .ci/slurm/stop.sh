#!/usr/bin/env bash
# Stop the single-node Slurm started by .ci/slurm/start.sh, in reverse order, by pid file only.
#
# Usage: .ci/slurm/stop.sh [--purge]   --purge also deletes $SQUALL_SLURM_DIR (state, logs, database)
# A daemon whose pid file is missing, stale or names another program is left alone.
set -euo pipefail

DIR=${SQUALL_SLURM_DIR:-/tmp/squall-slurm}
log() { echo "[slurm-stop] $*" >&2; }

pidfile() {
    case $1 in
        munged) echo "$DIR/munge/munged.pid" ;;
        mariadbd) echo "$DIR/db/mariadbd.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

stop() {
    local name=$1 file pid
    file=$(pidfile "$name")
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    # /proc/PID/comm is truncated to 15 characters; a mismatch means the pid was reused.
    if [ ! -d "/proc/$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "${name:0:15}" ]; then
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid"
    # Daemons flush state on SIGTERM; 15 s covers slurmctld saving state and mariadb shutting down.
    for _ in $(seq 75); do
        [ -d "/proc/$pid" ] || { log "stopped $name ($pid)"; rm -f "$file"; return 0; }
        sleep 0.2
    done
    log "$name ($pid) ignored SIGTERM for 15 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done
if [ "${1:-}" = "--purge" ]; then
    rm -rf "$DIR"
    log "removed $DIR"
fi
