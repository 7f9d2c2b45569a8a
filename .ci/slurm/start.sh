#!/usr/bin/env bash
# Start a single-node Slurm (munge, mariadb, slurmdbd, slurmctld, slurmd) on 127.0.0.1 for tests/CI.
#
# Usage: .ci/slurm/start.sh            installs Debian's packages if missing, starts the daemons,
#                                      waits until the node is idle, writes $DIR/env.sh
#        . "$SQUALL_SLURM_DIR/env.sh"  (or /tmp/squall-slurm/env.sh) exports SLURM_CONF for clients
#
# Environment (all optional):
#   SQUALL_SLURM_DIR        state, spool, logs, pid files, configs   [/tmp/squall-slurm]
#   SQUALL_SLURM_CPUS       CPUs the node advertises                 [4]
#   SQUALL_SLURM_PARTITION  name of the default partition            [debug]
#   SQUALL_SLURM_PORT_BASE  slurmctld port; slurmd +1, slurmdbd +2    [6817, Slurm's default]
#   SQUALL_SLURM_TIMEOUT_S  seconds to wait for each daemon          [60]
#
# Idempotent: a second call while everything runs only re-checks the node. Exit status 0 when the
# node is idle, 3 when Slurm is not installed and cannot be (not root, no apt-get), 1 otherwise;
# on failure the log paths are printed. Stop with .ci/slurm/stop.sh (by pid file, never by name).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${SQUALL_SLURM_DIR:-/tmp/squall-slurm}
CPUS=${SQUALL_SLURM_CPUS:-4}
PARTITION=${SQUALL_SLURM_PARTITION:-debug}
PORT_BASE=${SQUALL_SLURM_PORT_BASE:-6817}
TIMEOUT_S=${SQUALL_SLURM_TIMEOUT_S:-60}
HOST=$(hostname -s)
export SLURM_CONF=$DIR/etc/slurm.conf
# slurmdbd's MySQL client reads this to find our private mariadb socket.
export MYSQL_UNIX_PORT=$DIR/db/mysqld.sock

log() { echo "[slurm-start] $*" >&2; }
fail() {
    log "FAILED: $*"
    log "logs: $DIR/log/ (munged.log mariadb.log slurmdbd.log slurmctld.log slurmd.log)"
    for f in "$DIR"/log/*.log; do
        [ -s "$f" ] && { log "--- tail $f"; tail -n 15 "$f" >&2; }
    done
    exit 1
}

# pidfile NAME: where daemon NAME writes its pid (munged and mariadbd need a directory they own).
pidfile() {
    case $1 in
        munged) echo "$DIR/munge/munged.pid" ;;
        mariadbd) echo "$DIR/db/mariadbd.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

# pid_alive NAME: the pid in NAME's pid file is running and is NAME (guards against pid reuse).
pid_alive() {
    local pidfile pid
    pidfile=$(pidfile "$1")
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -d "/proc/$pid" ] || return 1
    # /proc/PID/comm is truncated to 15 characters.
    [ "$(cat "/proc/$pid/comm")" = "${1:0:15}" ]
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "$what not ready after ${limit} s"
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    for bin in munged slurmctld slurmd sbatch sacct slurmdbd mariadbd mariadb-install-db; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]} and cannot install them (no apt-get)"
        exit 3
    fi
    log "installing Slurm, munge, mariadb (missing: ${missing[*]})"
    # Keep package scripts from starting system-wide daemons (no systemd here; we start our own).
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && added=1
    fi
    apt-get update -qq >"$DIR/log/apt.log" 2>&1 || { log "apt-get update failed, see $DIR/log/apt.log"; exit 3; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client slurmdbd munge mariadb-server >>"$DIR/log/apt.log" 2>&1 ||
        { log "apt-get install failed, see $DIR/log/apt.log"; [ $added -eq 1 ] && rm -f $policy; exit 3; }
    [ $added -eq 1 ] && rm -f $policy
    return 0
}

render() {  # render TEMPLATE OUT
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" \
        -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@CTLD_PORT@|$PORT_BASE|g" -e "s|@SLURMD_PORT@|$((PORT_BASE + 1))|g" \
        -e "s|@DBD_PORT@|$((PORT_BASE + 2))|g" "$1" >"$2"
}

start_munge() {
    pid_alive munged && return 0
    # Slurm 22.05's clients ignore AuthInfo=socket= when talking to slurmdbd, so munged uses the
    # default socket; one already answering there (not ours) is used as it is.
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && { log "using the munged already running"; return 0; }
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    install -d -o munge -g munge -m 755 "$DIR/munge" /run/munge
    # munged runs as munge and writes its own pid file and log.
    install -o munge -g munge -m 600 /dev/null "$DIR/log/munged.log"
    runuser -u munge -- /usr/sbin/munged --pid-file="$(pidfile munged)" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&- ||
        fail "munged did not start"
    wait_for "$TIMEOUT_S" munged bash -c "munge -n | unmunge"
}

start_mariadb() {
    pid_alive mariadbd && return 0
    if [ ! -d "$DIR/db/data/mysql" ]; then
        install -d -o mysql -g mysql "$DIR/db" "$DIR/db/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/db/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$DIR/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db (see mariadb-install.log)"
    fi
    install -o mysql -g mysql -m 640 /dev/null "$DIR/log/mariadb.log"
    # No TCP at all; small buffer pool (accounting of a few test jobs); relaxed flushing (CI data).
    setsid mariadbd --no-defaults --user=mysql --datadir="$DIR/db/data" --socket="$MYSQL_UNIX_PORT" \
        --pid-file="$(pidfile mariadbd)" --log-error="$DIR/log/mariadb.log" --skip-networking \
        --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=2 \
        >/dev/null 2>&1 </dev/null 9>&- &
    wait_for "$TIMEOUT_S" mariadbd mariadb --no-defaults --socket="$MYSQL_UNIX_PORT" -u root -e "SELECT 1"
    wait_for 5 "mariadbd pid file" pid_alive mariadbd
}

start_slurmdbd() {
    pid_alive slurmdbd && return 0
    slurmdbd 9>&- || fail "slurmdbd did not start"
    wait_for "$TIMEOUT_S" slurmdbd sacctmgr -n show cluster
}

start_slurmctld() {
    pid_alive slurmctld && return 0
    slurmctld 9>&- || fail "slurmctld did not start"
    wait_for "$TIMEOUT_S" slurmctld scontrol ping
}

# node_registered: the node's slurmd registered after $SLURMD_T0 (not a state-file leftover).
node_registered() {
    local line start_epoch
    line=$(scontrol -o show node "$HOST") || return 1
    start_epoch=$(date -d "$(sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$line")" +%s) || return 1
    [ "$start_epoch" -ge "$SLURMD_T0" ]
}

# node_idle: ready for jobs (or already running some).
node_idle() {
    scontrol -o show node "$HOST" | grep -Eq 'State=(IDLE|MIXED|ALLOCATED)( |$)'
}

start_slurmd() {
    if pid_alive slurmd; then
        SLURMD_T0=0
    else
        # SlurmdStartTime has one-second resolution.
        SLURMD_T0=$(date +%s)
        slurmd 9>&- || fail "slurmd did not start"
    fi
    wait_for "$TIMEOUT_S" "slurmd of node $HOST registering" node_registered
    # A node drained by an earlier crash (e.g. "Kill task failed") stays drained across restarts.
    if scontrol -o show node "$HOST" | grep -q 'State=[A-Z+]*DRAIN'; then
        log "node $HOST was drained ($(scontrol -o show node "$HOST" | sed -n 's/.*Reason=\(.*\)/\1/p')); resuming it"
        scontrol update NodeName="$HOST" State=RESUME
    fi
    wait_for "$TIMEOUT_S" "node $HOST idle" node_idle
}

if [ "$(id -u)" -ne 0 ]; then
    log "needs root: the daemons run as root, munge and mysql"
    exit 3
fi
mkdir -p "$DIR"/{etc,run,log,state,spool}
exec 9>"$DIR/start.lock"
# One start at a time (CI script and pytest fixture may race); daemons get 9>&- so that they
# do not inherit, and hold, the lock.
flock 9
install_packages

# 90 % of the real memory: slurmd drains a node that has less than it advertises.
MEM_MB=$(($(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 9 / 10))
before=$(cat "$SLURM_CONF" 2>/dev/null || true)
render "$HERE/slurm.conf.in" "$SLURM_CONF"
render "$HERE/slurmdbd.conf.in" "$DIR/etc/slurmdbd.conf"
chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a readable config
printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" >"$DIR/env.sh"

t0=$SECONDS
start_munge
start_mariadb
start_slurmdbd
start_slurmctld
start_slurmd
# Daemons that were running already read the new slurm.conf (e.g. a partition added since).
if [ "$before" != "$(cat "$SLURM_CONF")" ] && [ -n "$before" ]; then
    scontrol reconfigure || fail "scontrol reconfigure after a slurm.conf change"
fi
log "ready in $((SECONDS - t0)) s: node $HOST, $CPUS CPUs, partition $PARTITION; . $DIR/env.sh"
