#!/usr/bin/env bash
# Starts and stops a throwaway Postgres and Redis in a directory of their own,
# on free loopback ports. Never touches a system-wide instance.
#
#   scripts/stack.sh start DIR   -> writes DIR/env (DATABASE_URL, REDIS_URL, ...)
#   scripts/stack.sh stop DIR
#   scripts/stack.sh pg-stop|pg-start|redis-stop|redis-start DIR
#                                -> one service of a started stack, same ports
#                                   (fault tests take a store away and back)
#   scripts/stack.sh cluster-start|cluster-stop DIR
#                                -> beside a started stack, a Redis Cluster of
#                                   3 masters and 3 replicas on loopback, with
#                                   the stack's passwords and ACL user; adds
#                                   CLUSTER_URL, GATEWAY_CLUSTER_URL and
#                                   CLUSTER_PORTS (masters first) to DIR/env
#
# Least privilege, as in production (README, "Least privilege"):
#   Redis     requires a password (the default user: billing and admin
#             tools, REDIS_URL and REDIS_PASSWORD in DIR/env) and has an ACL
#             user pointgate-gateway limited to the commands the gateway and
#             its scripts run on pg:* keys (GATEWAY_REDIS_URL); maxmemory
#             STACK_REDIS_MAXMEMORY (1gb) with noeviction, so a full Redis
#             refuses writes instead of dropping balances or the outbox.
#   Postgres  a role pointgate_gateway with a password (GATEWAY_DATABASE_URL),
#             checked (scram) even though the rest of this throwaway cluster
#             trusts local connections; schema/006_gateway_role.sql grants
#             it SELECT on usage_daily only, at `billing migrate`.
# Passwords are random per stack unless STACK_REDIS_PASSWORD,
# STACK_GATEWAY_REDIS_PASSWORD or STACK_GATEWAY_PG_PASSWORD are set
# (hex or other URL-safe characters). DIR/env and the Redis config are 0600.
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
usage="usage: $0 start|stop|pg-start|pg-stop|redis-start|redis-stop|cluster-start|cluster-stop DIR"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "$usage" >&2; exit 2; }

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$pgbin/initdb" ] || { echo "stack: PostgreSQL server binaries not found" >&2; exit 1; }

GATEWAY_REDIS_USER=pointgate-gateway
GATEWAY_PG_ROLE=pointgate_gateway

# What the gateway may run, on pg:* keys only, with no pub/sub. A script runs
# with its caller's ACL, so this is the union of gateway/hotclient.c's own
# commands (AUTH, SELECT, SCRIPT LOAD, EVALSHA and EVAL, MGET of a key and
# the epoch marker,
# HMGET of a balance), those of the scripts it runs (billing/reserve.lua,
# settle.lua, lease.lua and common/prelude.lua: HGET HMGET HSET HDEL HINCRBY
# XADD TIME) and those of the backlog bound, the epoch marker and late
# settles (GET and INCRBY pg:backlog, the epoch in the key lookup, SET/DEL/EXPIRE of
# pg:{A}:swept:*), plus PING. Everything else is refused: FLUSHALL,
# FLUSHDB, CONFIG, KEYS, SCAN, DEBUG, SHUTDOWN, ACL, MODULE, SCRIPT
# FLUSH/KILL, FUNCTION, MIGRATE, XREADGROUP, ...
GATEWAY_REDIS_COMMANDS="+auth +ping +select +eval +evalsha +script|load +get +mget +set +del +exists \
+expire +incrby +time +hget +hmget +hset +hdel +hincrby +xadd"
# On a cluster, also the slot map and the one-command redirection.
GATEWAY_CLUSTER_COMMANDS="+cluster|slots +cluster|shards +asking"

# A random hex secret (URL-safe as it is).
secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

# redis-cli as the default user; the password goes by environment, never on
# a command line that ps shows.
rcli() { REDISCLI_AUTH="${REDIS_PASSWORD:-}" redis-cli --no-auth-warning "$@"; }

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
    REDIS_PASSWORD=${STACK_REDIS_PASSWORD:-$(secret)}
    local gw_redis_pw=${STACK_GATEWAY_REDIS_PASSWORD:-$(secret)}
    local gw_pg_pw=${STACK_GATEWAY_PG_PASSWORD:-$(secret)}
    as_pg "$pgbin/initdb" -D "$pgdir/data" -U postgres -A trust --no-sync -E UTF8 \
        >"$pgdir/initdb.log" 2>&1 || { cat "$pgdir/initdb.log" >&2; exit 1; }
    # The gateway's role logs in with its password (first match wins); the
    # rest of this throwaway cluster keeps trust.
    as_pg sed -i "1i local all $GATEWAY_PG_ROLE scram-sha-256\\
host all $GATEWAY_PG_ROLE 127.0.0.1/32 scram-sha-256\\
host all $GATEWAY_PG_ROLE ::1/128 scram-sha-256" "$pgdir/data/pg_hba.conf"
    pg_start "$pgport"
    as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U postgres pointgate
    # On stdin: the password is not on a command line. Its grants come with
    # the schema (`billing migrate`, schema/006_gateway_role.sql).
    as_pg "$pgbin/psql" -q -h 127.0.0.1 -p "$pgport" -U postgres -d pointgate -v ON_ERROR_STOP=1 \
        >/dev/null <<SQL || { echo "stack: cannot create the role $GATEWAY_PG_ROLE" >&2; exit 1; }
DO \$\$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$GATEWAY_PG_ROLE') THEN
        CREATE ROLE $GATEWAY_PG_ROLE;
    END IF;
END \$\$;
ALTER ROLE $GATEWAY_PG_ROLE LOGIN PASSWORD '$gw_pg_pw';
SQL
    redis_conf "$rport" "$gw_redis_pw"
    redis_start
    (
        umask 077
        cat >"$dir/env" <<ENV
export DATABASE_URL="postgresql://postgres@127.0.0.1:$pgport/pointgate"
export REDIS_URL="redis://:$REDIS_PASSWORD@127.0.0.1:$rport/0"
export REDIS_PASSWORD="$REDIS_PASSWORD"
export GATEWAY_REDIS_URL="redis://$GATEWAY_REDIS_USER:$gw_redis_pw@127.0.0.1:$rport/0"
export GATEWAY_DATABASE_URL="postgresql://$GATEWAY_PG_ROLE:$gw_pg_pw@127.0.0.1:$pgport/pointgate"
export PGPORT_STACK=$pgport
export REDIS_PORT_STACK=$rport
export PGDIR_STACK="$pgdir"
ENV
    )
    echo "stack: postgres on 127.0.0.1:$pgport, redis on 127.0.0.1:$rport ($dir)" >&2
}

# DIR/redis/redis.conf (0600: it holds the passwords), read again by
# redis-start. maxmemory: see README ("Sizing Redis"); noeviction: at the
# limit writes fail (the gateway answers 503) and nothing is ever evicted.
# The lines every Redis of a stack shares, single or cluster node: AOF,
# the memory bound, the passwords and the gateway's ACL user (password $1,
# commands beyond GATEWAY_REDIS_COMMANDS $2).
redis_conf_common() {
    cat <<CONF
appendonly yes
appendfsync everysec
save ""
maxmemory ${STACK_REDIS_MAXMEMORY:-1gb}
maxmemory-policy noeviction
requirepass $REDIS_PASSWORD
user $GATEWAY_REDIS_USER on >$1 resetkeys ~pg:* resetchannels -@all $GATEWAY_REDIS_COMMANDS${2:+ $2}
CONF
}

redis_conf() {
    (
        umask 077
        cat >"$dir/redis/redis.conf" <<CONF
# Generated by scripts/stack.sh.
port $1
bind 127.0.0.1
dir $dir/redis
daemonize yes
pidfile $dir/redis/redis.pid
logfile $dir/redis/redis.log
$(redis_conf_common "$2" "")
CONF
    )
}

pg_start() {
    # fsync off: this is a throwaway instance for tests and demos; crash tests
    # kill our processes, never this server.
    as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/server.log" -w -t 60 \
        -o "-p $1 -k $pgdir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || { cat "$pgdir/server.log" >&2; exit 1; }
}

redis_start() {
    local port
    port=$(awk '$1 == "port" { print $2 }' "$dir/redis/redis.conf")
    redis-server "$dir/redis/redis.conf" >/dev/null
    for _ in $(seq 1 200); do
        rcli -p "$port" ping 2>/dev/null | grep -q PONG && return 0
        sleep 0.05
    done
    echo "stack: redis did not start" >&2
    exit 1
}

# A port free_port gives that is not in the list USED (free_port only
# checks that nothing is bound now: two calls may give the same one).
fresh_port() {
    local p
    for _ in $(seq 1 50); do
        p=$(free_port)
        case " $used " in *" $p "*) continue ;; esac
        used="$used $p"
        echo "$p"
        return 0
    done
    echo "stack: no free port" >&2
    exit 1
}

# Waits up to 20 s until redis-cli -p PORT CMD prints a line matching RE;
# else exits with WHAT.
wait_for() {
    local port=$1 cmd=$2 re=$3 what=$4
    for _ in $(seq 1 400); do
        # shellcheck disable=SC2086
        rcli -p "$port" $cmd 2>/dev/null | grep -q "$re" && return 0
        sleep 0.05
    done
    echo "stack: $what" >&2
    exit 1
}

# A Redis Cluster beside the stack: 6 nodes (3 masters, 3 replicas) with the
# stack's passwords, cluster bus ports chosen free like the others (not the
# default port + 10000, which may fall in the ephemeral range), a short
# node timeout so that a failover takes about 2 s, AOF like the single one.
cluster_start() {
    local gw_pw ports="" used="" p bus seeds="" n=0
    gw_pw=$(printf '%s' "$GATEWAY_REDIS_URL" | sed -E 's|^redis://[^:]*:([^@]*)@.*$|\1|')
    mkdir -p "$dir/cluster"
    for _ in 1 2 3 4 5 6; do
        p=$(fresh_port)
        bus=$(fresh_port)
        mkdir -p "$dir/cluster/$p"
        (
            umask 077
            cat >"$dir/cluster/$p/redis.conf" <<CONF
# Generated by scripts/stack.sh cluster-start.
port $p
bind 127.0.0.1
dir $dir/cluster/$p
daemonize yes
pidfile $dir/cluster/$p/redis.pid
logfile $dir/cluster/$p/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-port $bus
cluster-node-timeout 2000
repl-diskless-sync-delay 0
masterauth $REDIS_PASSWORD
$(redis_conf_common "$gw_pw" "$GATEWAY_CLUSTER_COMMANDS")
CONF
        )
        redis-server "$dir/cluster/$p/redis.conf" >/dev/null
        ports="$ports $p"
    done
    for p in $ports; do
        for _ in $(seq 1 200); do
            rcli -p "$p" ping 2>/dev/null | grep -q PONG && break
            sleep 0.05
        done
    done
    # shellcheck disable=SC2086
    rcli --cluster create $(for p in $ports; do printf '127.0.0.1:%s ' "$p"; done) \
        --cluster-replicas 1 --cluster-yes >"$dir/cluster/create.log" 2>&1 ||
        { cat "$dir/cluster/create.log" >&2; exit 1; }
    for p in $ports; do
        wait_for "$p" "cluster info" '^cluster_state:ok' "cluster node $p not ok"
    done
    # A replica that never finished its first sync may not take over (its
    # data counts as too old): wait for every link.
    n=0
    for p in $ports; do
        n=$((n + 1))
        [ $n -le 3 ] && continue
        wait_for "$p" "info replication" '^master_link_status:up' "cluster replica $p not in sync"
    done
    n=0
    # Masters first (redis-cli made the first three masters), as seeds.
    for p in $ports; do
        n=$((n + 1))
        [ $n -le 3 ] && seeds="$seeds${seeds:+,}127.0.0.1:$p"
    done
    (
        umask 077
        cat >>"$dir/env" <<ENV
export CLUSTER_URL="redis+cluster://:$REDIS_PASSWORD@$seeds"
export GATEWAY_CLUSTER_URL="redis+cluster://$GATEWAY_REDIS_USER:$gw_pw@$seeds"
export CLUSTER_PORTS="${ports# }"
ENV
    )
    echo "stack: redis cluster on$ports" >&2
}

cluster_stop() {
    local p
    for p in ${CLUSTER_PORTS:-}; do
        rcli -p "$p" shutdown nosave >/dev/null 2>&1 || true
    done
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
        rcli -p "$REDIS_PORT_STACK" shutdown nosave >/dev/null 2>&1 || true
        cluster_stop
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
    redis-start) load_env && redis_start ;;
    redis-stop)
        load_env
        rcli -p "$REDIS_PORT_STACK" shutdown >/dev/null 2>&1 || true
        for _ in $(seq 1 200); do
            rcli -p "$REDIS_PORT_STACK" ping >/dev/null 2>&1 || exit 0
            sleep 0.05
        done
        echo "stack: redis did not stop" >&2
        exit 1
        ;;
    cluster-start) load_env && cluster_start ;;
    cluster-stop) load_env && cluster_stop ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
