#!/usr/bin/env bash
# The whole pointgate stack on this machine, for trying it out (`make run`).
#
#   scripts/run.sh [start]   (re)starts everything, seeds a demo account, prints what to try
#   scripts/run.sh stop      stops the processes and the local Postgres and Redis
#   scripts/run.sh status    shows what is running
#
# Owns .stack/ at the repo root: Postgres and Redis (scripts/stack.sh, fixed
# ports 55432 and 56379 when free), the secrets (.stack/secrets, made once and
# kept), the binaries it runs (.stack/bin: copies, so that `make` can replace
# bin/* while the stack runs), the logs (.stack/*.log) and pids (.stack/*.pid).
# The database starts empty on every start; the secrets stay.
#
# Addresses can be overridden from the environment: GATEWAY_LISTEN
# (127.0.0.1:8080), BILLING_LISTEN (127.0.0.1:8081), DEVSIM_LISTEN
# (127.0.0.1:9090), GATEWAY_OPS_LISTEN (127.0.0.1:9180), BILLING_OPS_LISTEN
# (127.0.0.1:9181), ROUTES_FILE (routes.example.json).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK="$ROOT/.stack"
SERVICES=(devsim billing gateway) # start order; stopped in reverse
started=0                         # set once a start has fully succeeded

GATEWAY_LISTEN=${GATEWAY_LISTEN:-127.0.0.1:8080}
BILLING_LISTEN=${BILLING_LISTEN:-127.0.0.1:8081}
DEVSIM_LISTEN=${DEVSIM_LISTEN:-127.0.0.1:9090}
GATEWAY_OPS_LISTEN=${GATEWAY_OPS_LISTEN:-127.0.0.1:9180}
BILLING_OPS_LISTEN=${BILLING_OPS_LISTEN:-127.0.0.1:9181}
ROUTES_FILE=${ROUTES_FILE:-$ROOT/routes.example.json}

say() { printf 'run: %s\n' "$*" >&2; }
# A URL without its password (for printing).
redact() { sed -E 's#(//[^:/@]*:)[^@]*@#\1***@#' <<<"$1"; }
die() {
    say "error: $*"
    exit 1
}

# ---- processes --------------------------------------------------------------

port_of() { echo "${1##*:}"; }
host_of() {
    local h=${1%:*}
    h=${h#[}
    echo "${h%]}"
}

# Something accepts connections on HOST PORT.
port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# A server could bind HOST PORT now (as servers do, with SO_REUSEADDR). Unlike
# a connect probe this also sees ports held by outgoing connections, which
# ports in the ephemeral range (55432, 56379) can be.
port_bindable() {
    python3 - "$1" "$2" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
PY
}

# The pid in .stack/NAME.pid if that process is still ours (not a recycled pid).
live_pid() {
    local name=$1 pid exe
    [ -f "$STACK/$name.pid" ] || return 1
    pid=$(cat "$STACK/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [ "${exe% (deleted)}" = "$STACK/bin/$name" ] || return 1
    echo "$pid"
}

show_log() {
    local log="$STACK/$1.log"
    [ -f "$log" ] || return 0
    say "last lines of $log:"
    tail -n 30 "$log" | sed 's/^/    /' >&2
}

stop_one() {
    local name=$1 pid
    pid=$(live_pid "$name") || {
        rm -f "$STACK/$name.pid"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STACK/$name.pid"
    say "stopped $name (pid $pid)"
}

stop_all() {
    local i
    [ -d "$STACK" ] || return 0
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        stop_one "${SERVICES[$i]}"
    done
    if [ -f "$STACK/env" ]; then
        "$ROOT/scripts/stack.sh" stop "$STACK"
        rm -f "$STACK/env"
        say "stopped postgres and redis"
    fi
}

# Starts NAME (from .stack/bin) in its own session, detached from this
# terminal, and waits until it listens on ADDR. Extra arguments follow.
start_one() {
    local name=$1 addr=$2 pid host port
    shift 2
    host=$(host_of "$addr")
    port=$(port_of "$addr")
    if ! port_bindable "$host" "$port"; then
        die "$name: $addr is already in use (see: ss -tnp 'sport = :$port')"
    fi
    (exec setsid "$STACK/bin/$name" "$@" >>"$STACK/$name.log" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" >"$STACK/$name.pid"
    for _ in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log "$name"
            die "$name exited before listening on $addr"
        fi
        port_busy "$host" "$port" && {
            say "started $name (pid $pid) on $addr, log: .stack/$name.log"
            return 0
        }
        sleep 0.1
    done
    show_log "$name"
    die "$name did not listen on $addr within 15 s"
}

# ---- admin API ---------------------------------------------------------------

# admin METHOD PATH [JSON]: the response body on 2xx; dies with the body otherwise.
admin() {
    local method=$1 path=$2 data=${3:-} out status
    local args=(-sS -X "$method" -H "Authorization: Bearer $ADMIN_TOKEN" -w '\n%{http_code}'
        --max-time 10)
    [ -n "$data" ] && args+=(-H 'Content-Type: application/json' --data "$data")
    out=$(curl "${args[@]}" "http://$BILLING_LISTEN$path") || die "admin API: $method $path failed"
    status=${out##*$'\n'}
    out=${out%$'\n'*}
    [[ $status == 2?? ]] || die "admin API: $method $path answered $status: $out"
    printf '%s' "$out"
}

# new_account NAME POINTS -> "ACCOUNT_ID API_KEY"
new_account() {
    local name=$1 points=$2 id key
    id=$(admin POST /v1/accounts "{\"name\":\"$name\"}" | jq -er .id) ||
        die "admin API: no id in the new account"
    admin POST "/v1/accounts/$id/topups" "{\"amount\":$points,\"reference\":\"$name-seed\"}" >/dev/null
    key=$(admin POST "/v1/accounts/$id/keys" | jq -er .api_key) ||
        die "admin API: no api_key in the new key"
    echo "$id $key"
}

# ---- start ---------------------------------------------------------------------

load_secrets() {
    if [ ! -s "$STACK/secrets" ]; then
        gen() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
        (
            umask 077
            {
                echo "# pointgate local secrets, made by scripts/run.sh; delete to renew."
                echo "export KEY_PEPPER=$(gen)"
                echo "export ADMIN_TOKEN=$(gen)"
                echo "export FINANCE_TOKEN=$(gen)"
            } >"$STACK/secrets.tmp"
        )
        mv "$STACK/secrets.tmp" "$STACK/secrets"
        say "made new secrets in .stack/secrets"
    fi
    # shellcheck disable=SC1091
    . "$STACK/secrets"
}

start_all() {
    local name acct key acct3 key3 pgwanted rwanted addr tool

    for name in "${SERVICES[@]}"; do
        [ -x "$ROOT/bin/$name" ] || die "bin/$name is missing: build it with 'make'"
    done
    [ -f "$ROUTES_FILE" ] || die "ROUTES_FILE $ROUTES_FILE does not exist"
    for tool in curl jq python3; do
        command -v "$tool" >/dev/null || die "$tool is needed (scripts/deps.sh installs it)"
    done

    stop_all # a previous run, if any
    for addr in "$DEVSIM_LISTEN" "$BILLING_LISTEN" "$GATEWAY_LISTEN" "$BILLING_OPS_LISTEN" \
        "$GATEWAY_OPS_LISTEN"; do
        port_bindable "$(host_of "$addr")" "$(port_of "$addr")" ||
            die "$addr is already in use (see: ss -tnp 'sport = :$(port_of "$addr")')"
    done
    mkdir -p "$STACK"
    rm -rf "${STACK:?}/pg" "${STACK:?}/redis" "${STACK:?}/bin"
    rm -f "$STACK"/*.log
    trap 'if [ "$started" -eq 0 ]; then say "start failed; cleaning up"; stop_all; fi' EXIT
    trap 'exit 130' INT TERM

    mkdir -p "$STACK/bin"
    for name in "${SERVICES[@]}"; do
        cp "$ROOT/bin/$name" "$STACK/bin/$name"
    done
    load_secrets

    pgwanted=55432
    rwanted=56379
    if ! port_bindable 127.0.0.1 "$pgwanted"; then
        say "port $pgwanted is taken; postgres gets a free one"
        pgwanted=
    fi
    if ! port_bindable 127.0.0.1 "$rwanted"; then
        say "port $rwanted is taken; redis gets a free one"
        rwanted=
    fi
    PGPORT_WANTED=$pgwanted REDIS_PORT_WANTED=$rwanted "$ROOT/scripts/stack.sh" start "$STACK" ||
        die "could not start postgres and redis (see the server.log in PGDIR_STACK of .stack/env, .stack/pg by default)"
    # shellcheck disable=SC1091
    . "$STACK/env"

    export DATABASE_URL REDIS_URL KEY_PEPPER ADMIN_TOKEN FINANCE_TOKEN
    export BILLING_LISTEN GATEWAY_LISTEN DEVSIM_LISTEN ROUTES_FILE GATEWAY_OPS_LISTEN BILLING_OPS_LISTEN
    export UPSTREAM_URL=${UPSTREAM_URL:-http://$DEVSIM_LISTEN}
    export LOG_LEVEL=${LOG_LEVEL:-info}

    "$STACK/bin/billing" migrate >>"$STACK/billing.log" 2>&1 || {
        show_log billing
        die "billing migrate failed"
    }
    say "migrated the database"
    start_one devsim "$DEVSIM_LISTEN"
    start_one billing "$BILLING_LISTEN" serve
    # The gateway with least privilege: its own Redis ACL user and Postgres
    # role (scripts/stack.sh), not billing's.
    (
        export REDIS_URL=$GATEWAY_REDIS_URL DATABASE_URL=$GATEWAY_DATABASE_URL
        start_one gateway "$GATEWAY_LISTEN"
    ) || exit 1

    read -r acct key < <(new_account demo 20)
    read -r acct3 key3 < <(new_account demo-small 3)
    if [ -z "$acct" ] || [ -z "$acct3" ]; then die "could not create the demo accounts"; fi
    started=1

    {
        echo "ACCOUNT_ID=$acct"
        echo "API_KEY=$key"
        echo "SMALL_ACCOUNT_ID=$acct3"
        echo "SMALL_API_KEY=$key3"
    } >"$STACK/demo"
    chmod 600 "$STACK/demo"
    print_howto "$acct" "$key" "$acct3" "$key3"
    print_ops "$key"
}

# The operator's view: the ops endpoints, billing's metrics after one call,
# and `billing status`.
print_ops() {
    local key=$1 gops="http://$GATEWAY_OPS_LISTEN" bops="http://$BILLING_OPS_LISTEN"
    curl -s -o /dev/null -H "Authorization: Bearer $key" "http://$GATEWAY_LISTEN/v1/devices/thermo-1" || true
    sleep 0.5 # the call's charge reaches Postgres (settlement polls every SETTLE_LINGER_MS)
    cat <<EOF

Operations (ops ports: loopback only, never the public listener):
  gateway   $gops/metrics  $gops/healthz  $gops/readyz
  billing   $bops/metrics  $bops/healthz  $bops/readyz
  logs      LOG_FORMAT=json for JSON lines; ACCESS_LOG=stderr|PATH for one line per call;
            kill -USR1 (or -HUP) reopens log files after logrotate

\$ curl -s $bops/metrics | grep '^pointgate_billing_'
EOF
    curl -s --max-time 5 "$bops/metrics" | grep '^pointgate_billing_' | grep -v '_bucket{' | head -n 40 || true
    printf '\n$ curl -s %s/readyz\n' "$gops"
    curl -s --max-time 5 "$gops/readyz" || true
    printf '\n\n$ billing status\n'
    "$STACK/bin/billing" status || true
    echo
}

print_howto() {
    local acct=$1 key=$2 acct3=$3 key3=$4 gw="http://$GATEWAY_LISTEN" adm="http://$BILLING_LISTEN"
    cat <<EOF

pointgate is running.
  gateway      $gw            (log .stack/gateway.log)
  admin API    $adm            (log .stack/billing.log)
  device API   http://$DEVSIM_LISTEN  (simulator, log .stack/devsim.log)
  postgres     $(redact "$DATABASE_URL")  (the gateway: $(redact "$GATEWAY_DATABASE_URL"))
  redis        $(redact "$REDIS_URL")  (the gateway: $(redact "$GATEWAY_REDIS_URL"))
               passwords in .stack/env; redis-cli: REDISCLI_AUTH=\$REDIS_PASSWORD redis-cli -p $REDIS_PORT_STACK

Secrets (kept in .stack/secrets; 'source .stack/secrets' to use them):
  ADMIN_TOKEN=$ADMIN_TOKEN
  FINANCE_TOKEN=$FINANCE_TOKEN

Demo account "demo": $acct, 20 points, key $key
Second account "demo-small": $acct3, 3 points, key $key3

Try:
  # a charged call: 1 point (see X-Points-Charged and X-Points-Remaining)
  curl -i -H 'Authorization: Bearer $key' $gw/v1/devices/thermo-1

  # the device API fails (503): the call costs nothing
  curl -i -H 'Authorization: Bearer $key' -H 'X-Sim-Status: 503' $gw/v1/devices/thermo-1

  # a command costs 5 points; with 3 points it is refused (402) before the device API sees it
  curl -i -H 'Authorization: Bearer $key3' -X POST -H 'Content-Type: application/json' \\
       -d '{"command":"unlock"}' $gw/v1/devices/lock-1/commands

  # a batch holds 100 points, then costs 2 per item the device API reports
  # (X-Usage-Units) and releases the rest: top up first, then call it
  curl -s -H 'Authorization: Bearer $ADMIN_TOKEN' -H 'Content-Type: application/json' \\
       -d '{"amount":200,"reference":"demo-topup-1"}' $adm/v1/accounts/$acct/topups
  curl -i -H 'Authorization: Bearer $key' -X POST -H 'Content-Type: application/json' \\
       -d '{"items":[{"id":"thermo-1"},{"id":"thermo-2"}]}' $gw/v1/batch

  # a safe retry: the same Idempotency-Key twice runs the command once; the
  # second answer is the first one again (Idempotent-Replayed: true, 0 points)
  curl -i -H 'Authorization: Bearer $key' -X POST -H 'Idempotency-Key: demo-unlock-1' \\
       -d '{"command":"unlock"}' $gw/v1/devices/lock-1/commands
  curl -i -H 'Authorization: Bearer $key' -X POST -H 'Idempotency-Key: demo-unlock-1' \\
       -d '{"command":"unlock"}' $gw/v1/devices/lock-1/commands

  # a rate limit: 3 calls per 10 s for this account, the 4th answered 429
  # rate_limited with Retry-After and RateLimit headers, free and not proxied
  curl -s -X PUT -H 'Authorization: Bearer $ADMIN_TOKEN' -H 'Content-Type: application/json' \\
       -d '{"rate":{"quota":3,"window_s":10}}' $adm/v1/accounts/$acct/limits
  for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' -H 'Authorization: Bearer $key' $gw/v1/devices/thermo-1; done
  curl -i -H 'Authorization: Bearer $key' $gw/v1/devices/thermo-1

  # a spending cap: at most 2 points a day (UTC), then 429 quota_exceeded with resets_at
  curl -s -X PUT -H 'Authorization: Bearer $ADMIN_TOKEN' -H 'Content-Type: application/json' \\
       -d '{"daily_cap":2}' $adm/v1/accounts/$acct3/limits
  for i in 1 2; do curl -s -o /dev/null -w '%{http_code} ' -H 'Authorization: Bearer $key3' $gw/v1/devices/thermo-1; done
  curl -i -H 'Authorization: Bearer $key3' $gw/v1/devices/thermo-1
  curl -s -H 'Authorization: Bearer $key3' $gw/_billing/balance | jq .

  # the account as admins and finance see it
  curl -s -H 'Authorization: Bearer $ADMIN_TOKEN' $adm/v1/accounts/$acct | jq .
  curl -s -H 'Authorization: Bearer $FINANCE_TOKEN' $adm/v1/accounts/$acct/ledger | jq .

Stop everything: scripts/run.sh stop
EOF
}

status_all() {
    local name pid
    for name in "${SERVICES[@]}"; do
        if pid=$(live_pid "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
        fi
    done
    if [ -f "$STACK/env" ]; then
        # shellcheck disable=SC1091
        . "$STACK/env"
        echo "postgres: $(redact "$DATABASE_URL")"
        echo "redis: $(redact "$REDIS_URL") (passwords in .stack/env)"
    else
        echo "postgres, redis: not running"
    fi
}

case "${1:-start}" in
    start) start_all ;;
    stop) stop_all ;;
    status) status_all ;;
    *)
        echo "usage: $0 [start|stop|status]" >&2
        exit 2
        ;;
esac
