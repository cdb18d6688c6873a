#!/usr/bin/env bash
# Starts and stops a throwaway Postgres and Redis in a directory of their own,
# on free loopback ports. Never touches a system-wide instance.
#
#   scripts/stack.sh start DIR   -> writes DIR/env (DATABASE_URL, REDIS_URL, ...)
#   scripts/stack.sh stop DIR
#   scripts/stack.sh pg-stop|pg-start|redis-stop|redis-start DIR
#                                -> one service of a started stack, same ports
#                                   (fault tests take a store away and back)
#
# PostgreSQL refuses to run as root, so as root the cluster is owned and run by
# the unprivileged `postgres` user that Debian's package creates. That user
# must reach the cluster's directory: when DIR lies below a directory it
# cannot enter (root's home, a private mktemp directory), the cluster goes to
# /tmp/pointgate-pg.XXXXXX instead, named in DIR/env (PGDIR_STACK) and
# removed by `stop`.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop|pg-start|pg-stop|redis-start|redis-stop DIR" >&2; exit 2; }

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$pgbin/initdb" ] || { echo "stack: PostgreSQL server binaries not found" >&2; exit 1; }

# From / so that the postgres user is not refused our (possibly private) cwd.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# A port below the kernel's ephemeral range (so no outgoing connection can
# be holding it) that we can bind right now.
free_port() {
    python3 - <<'PY'
import random, socket
for _ in range(500):
    p = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
else:
    raise SystemExit("stack: no free port")
PY
}

start() {
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local pgport rport
    pgport=${PGPORT_WANTED:-$(free_port)}
    rport=${REDIS_PORT_WANTED:-$(free_port)}
    mkdir -p "$dir/redis"
    pgdir="$dir/pg"
    if [ "$(id -u)" -eq 0 ]; then
        chmod 755 "$dir"
        if ! as_pg test -x "$dir"; then
            pgdir=$(mktemp -d /tmp/pointgate-pg.XXXXXX)
            chmod 755 "$pgdir"
        fi
        mkdir -p "$pgdir"
        chown postgres "$pgdir"
    else
        mkdir -p "$pgdir"
    fi
    as_pg "$pgbin/initdb" -D "$pgdir/data" -U postgres -A trust --no-sync -E UTF8 \
        >"$pgdir/initdb.log" 2>&1 || { cat "$pgdir/initdb.log" >&2; exit 1; }
    pg_start "$pgport"
    as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U postgres pointgate
    redis_start "$rport"
    cat >"$dir/env" <<ENV
export DATABASE_URL="postgresql://postgres@127.0.0.1:$pgport/pointgate"
export REDIS_URL="redis://127.0.0.1:$rport/0"
export PGPORT_STACK=$pgport
export REDIS_PORT_STACK=$rport
export PGDIR_STACK="$pgdir"
ENV
    echo "stack: postgres on 127.0.0.1:$pgport, redis on 127.0.0.1:$rport ($dir)" >&2
}

pg_start() {
    # fsync off: this is a throwaway instance for tests and demos; crash tests
    # kill our processes, never this server.
    as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/server.log" -w -t 60 \
        -o "-p $1 -k $pgdir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || { cat "$pgdir/server.log" >&2; exit 1; }
}

redis_start() {
    redis-server --port "$1" --bind 127.0.0.1 --dir "$dir/redis" --daemonize yes \
        --pidfile "$dir/redis/redis.pid" --logfile "$dir/redis/redis.log" \
        --appendonly yes --appendfsync everysec --save "" >/dev/null
    for _ in $(seq 1 200); do
        redis-cli -p "$1" ping 2>/dev/null | grep -q PONG && return 0
        sleep 0.05
    done
    echo "stack: redis did not start" >&2
    exit 1
}

# For the single-service commands: the started stack's ports.
load_env() {
    [ -f "$dir/env" ] || { echo "stack: no stack in $dir" >&2; exit 1; }
    dir=$(cd "$dir" && pwd)
    # shellcheck disable=SC1091
    . "$dir/env"
    pgdir=${PGDIR_STACK:-$dir/pg}
}

stop() {
    [ -d "$dir" ] || return 0
    pgdir="$dir/pg"
    if [ -f "$dir/env" ]; then
        # shellcheck disable=SC1091
        . "$dir/env"
        pgdir=${PGDIR_STACK:-$dir/pg}
        redis-cli -p "$REDIS_PORT_STACK" shutdown nosave >/dev/null 2>&1 || true
    fi
    if [ -d "$pgdir/data" ]; then
        as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    case "$pgdir" in
        /tmp/pointgate-pg.*) rm -rf "$pgdir" ;;
    esac
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    pg-start) load_env && pg_start "$PGPORT_STACK" ;;
    pg-stop) load_env && as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m fast -w -t 60 stop >/dev/null ;;
    redis-start) load_env && redis_start "$REDIS_PORT_STACK" ;;
    redis-stop)
        load_env
        redis-cli -p "$REDIS_PORT_STACK" shutdown >/dev/null 2>&1 || true
        for _ in $(seq 1 200); do
            redis-cli -p "$REDIS_PORT_STACK" ping >/dev/null 2>&1 || exit 0
            sleep 0.05
        done
        echo "stack: redis did not stop" >&2
        exit 1
        ;;
    *) echo "usage: $0 start|stop|pg-start|pg-stop|redis-start|redis-stop DIR" >&2; exit 2 ;;
esac
