#!/usr/bin/env bash
# The benchmark (`make bench`): what the gateway costs on top of a plain proxy.
#
# Three targets, the same wrk run against each (-t2 -c64 -d10s --latency, the
# same path and headers):
#   upstream     a static nginx answering `return 200 "ok"` (the floor)
#   nginx-proxy  nginx proxy_pass to it through an upstream keepalive pool
#   gateway      bin/gateway with full billing: every call authenticated,
#                its price promised and its charge settled through Redis
#                (route GET /** price 1; the one bench account's calls are
#                served from a point lease, gateway/lease.h, with one
#                lease.lua op per loop pass), each charge a row in Postgres
#                written by the settlement worker of `bin/billing serve`
# nginx-proxy and gateway run in BENCH_ROUNDS interleaved rounds (median
# reported: the machine's speed drifts); then the gateway's peak RSS and its
# growth from the first round to the last, the settlement lag (from wrk's
# end until the outbox is drained and Postgres `spent` equals Redis
# `spent`), and a run on a fresh gateway with 1,000 open connections for its
# peak RSS (target 64 MiB). Last, what operations cost: BENCH_OPS_ROUNDS
# (BENCH_ROUNDS) interleaved rounds of the gateway plain, the same gateway
# with its /metrics scraped every second, and a second gateway writing the
# access log to a file while scraped (targets: within 3% and 8% of plain).
#
# Realistic traffic: each round also runs the many-accounts scenario on the
# same gateway (BENCH_MANY_ACCOUNTS, 1,000 accounts with a key each; 90% of
# them small, BENCH_MANY_SMALL_POINTS points, on per-call holds; 10% large,
# on leases; half the calls on each group, keys drawn at random per request
# by scripts/bench-many.lua), reported like the single account: requests/s,
# ratio to nginx-proxy and to the single account, CPU per call of each
# process, and the whole billing path's CPU per call against nginx proxy's.
#
# Fairness: both proxies get the same number of workers, BENCH_WORKERS
# (default 1): nginx `worker_processes N` for the proxy, GATEWAY_THREADS=N for
# the gateway (the static upstream always has one). One each by default
# because wrk, the upstream and the proxy share the cores of the usual 2-core
# machine; BENCH_WORKERS=2 is each one's own default there (nginx `auto`,
# the gateway one thread per core). The choice is printed with the results.
# The gateway also has Redis (the lease ops, the outbox), the settlement
# worker and Postgres beside it on the same cores: that is the price of
# billing, measured, and the report shows each process's CPU time per call
# during the gateway run so that it is clear where the time goes, and the
# nginx proxy's own CPU per call beside the gateway's (the two proxies' cost
# without what billing's Redis and Postgres add).
#
# Environment: BENCH_DURATION (10s, per run), BENCH_ROUNDS (3: nginx-proxy and
# gateway runs interleaved, medians reported), BENCH_THREADS (2), BENCH_CONNECTIONS (64),
# BENCH_MANY_CONNECTIONS (1000), BENCH_WORKERS (1; BENCH_GATEWAY_THREADS is
# an older name for it), BENCH_KEEP=1 keeps the temp dir. Results: a table on stdout, raw figures in
# build/bench/results.txt, wrk's own outputs in build/bench/wrk-*.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10s}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-64}
MANY=${BENCH_MANY_CONNECTIONS:-1000}
WORKERS=${BENCH_WORKERS:-${BENCH_GATEWAY_THREADS:-1}}
ROUNDS=${BENCH_ROUNDS:-3}
GW_THREADS=$WORKERS
RSS_TARGET_KB=$((64 * 1024))
OUT="$ROOT/build/bench"
BENCH_PATH=/v1/devices/bench-1

say() { printf 'bench: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

for tool in wrk nginx curl jq redis-cli psql python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/deps.sh installs it)"
done
for b in gateway billing; do
    [ -x "$ROOT/bin/$b" ] || die "bin/$b is missing: build it with 'make'"
done

TMP=$(mktemp -d /tmp/pointgate-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers and postgres (as root: other users) read below it
PIDS=()

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -f "$TMP/stack/env" ]; then "$ROOT/scripts/stack.sh" stop "$TMP/stack" || true; fi
    if [ "${BENCH_KEEP:-}" = 1 ]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Many open connections: wrk and the gateway inherit this.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((MANY + 512)) ] ||
    say "warning: ulimit -n is $(ulimit -n); the $MANY-connection run may fail"

# A port free to bind on 127.0.0.1, as the kernel picks it (a connect probe
# would miss ports held by outgoing connections).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' ||
        die "no free port"
}

# wait_port PORT PID NAME LOG
wait_port() {
    for _ in $(seq 1 150); do
        kill -0 "$2" 2>/dev/null || {
            tail -n 30 "$4" >&2 || true
            die "$3 exited before listening on port $1"
        }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    tail -n 30 "$4" >&2 || true
    die "$3 did not listen on port $1 within 15 s"
}

# spawn NAME PORT CMD...: runs CMD in the background, logs to $TMP/NAME.log,
# waits for PORT, and sets SPAWNED to its pid.
spawn() {
    local name=$1 port=$2
    shift 2
    "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    SPAWNED=$!
    PIDS+=("$SPAWNED")
    wait_port "$port" "$SPAWNED" "$name" "$TMP/$name.log"
}

# The process is gone (reaped): never signal its pid again.
forget_pid() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [ "$pid" = "$1" ] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# nginx_conf NAME PORT SERVER_BLOCK_BODY [HTTP_EXTRA [WORKERS]]
nginx_conf() {
    local name=$1 port=$2 body=$3 extra=${4:-} workers=${5:-1} dir="$TMP/$1"
    mkdir -p "$dir/temp"
    cat >"$dir/nginx.conf" <<EOF
# Generated by scripts/bench.sh.
$([ "$(id -u)" -eq 0 ] && echo "user root;")
worker_processes $workers;
worker_rlimit_nofile 65536;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    $extra
    server {
        listen 127.0.0.1:$port;
        $body
    }
}
EOF
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/check.log" ||
        die "nginx rejected $dir/nginx.conf: $(cat "$dir/check.log")"
}

# run_wrk LABEL URL CONNS [HEADER]: wrk's output in build/bench/wrk-LABEL.txt
run_wrk() { # label url conns [header]; WRK_SCRIPT=file adds -s file
    local label=$1 url=$2 conns=$3 header=${4:-}
    local args=(-t "$THREADS" -c "$conns" -d "$DURATION" --latency --timeout 10s)
    [ -n "$header" ] && args+=(-H "$header")
    [ -n "${WRK_SCRIPT:-}" ] && args+=(-s "$WRK_SCRIPT")
    say "wrk ${args[*]//Bearer */Bearer ...} $url ($label)"
    # In the background so that a signal interrupts the wait at once.
    wrk "${args[@]}" "$url" >"$OUT/wrk-$label.txt" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait "$pid" || {
        forget_pid "$pid"
        cat "$OUT/wrk-$label.txt" >&2
        die "wrk failed against $label"
    }
    forget_pid "$pid"
}

# Figures from a wrk output: rps p50 p99 requests non2xx socket_errors
wrk_figures() {
    awk '
        /Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = $2 }
        $1 == "99%" { p99 = $2 }
        / requests in / { reqs = $1 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ {
            gsub(",", ""); errs = $4 + $6 + $8 + $10
        }
        END { printf "%s %s %s %s %d %d\n", rps, p50, p99, reqs, non2xx, errs }
    ' "$1"
}

# wrk latency (e.g. 1.23ms, 850.00us, 1.02s) in microseconds
to_us() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub("us", "", v); print v + 0 }
        else if (v ~ /ms$/) { sub("ms", "", v); print v * 1000 }
        else if (v ~ /m$/) { sub("m", "", v); print v * 60000000 }
        else { sub("s", "", v); print v * 1000000 }
    }'
}

vmhwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
vmrss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# CPU time (clock ticks, user + system) of a process and its children
# (postgres: the postmaster and its backends alive now).
ticks_of() {
    local t=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] || continue
        t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
# "gateway redis postgres billing upstream" ticks, for the per-call breakdown
cpu_ticks() {
    local pm
    pm=$(head -n 1 "${PGDIR_STACK:-$TMP/stack/pg}/data/postmaster.pid" 2>/dev/null || echo 0)
    echo "$(ticks_of "$GW_PID") $(ticks_of "$(cat "$TMP/stack/redis/redis.pid" 2>/dev/null || echo 0)")" \
        "$(ticks_of "$pm" $(pgrep -P "$pm" 2>/dev/null))" "$(ticks_of "$BILLING_PID")" \
        "$(ticks_of $(pgrep -f "nginx: worker process" -P "$UPSTREAM_PID" 2>/dev/null))"
}

mkdir -p "$OUT"
: >"$OUT/results.txt"
record() { echo "$1=$2" >>"$OUT/results.txt"; }
record date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
record host "$(nproc) cores, $(awk '/MemTotal/ { print $2 " kB" }' /proc/meminfo)"
record wrk_params "-t$THREADS -c$CONNS -d$DURATION --latency, path $BENCH_PATH"
record workers_per_proxy "$WORKERS"
record gateway_threads "$GW_THREADS"

# ---- the static upstream and the nginx proxy ----------------------------------
UP_PORT=$(free_port)
nginx_conf upstream "$UP_PORT" 'location / { default_type text/plain; return 200 "ok"; }'
spawn upstream "$UP_PORT" nginx -p "$TMP/upstream" -c "$TMP/upstream/nginx.conf" -e "$TMP/upstream/error.log"
UPSTREAM_PID=$SPAWNED

PROXY_PORT=$(free_port)
nginx_conf proxy "$PROXY_PORT" '
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }' "upstream bench_upstream { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 1000000; }" "$WORKERS"
spawn proxy "$PROXY_PORT" nginx -p "$TMP/proxy" -c "$TMP/proxy/nginx.conf" -e "$TMP/proxy/error.log"
PROXY_PID=$SPAWNED

# ---- the billing stack and the gateway -----------------------------------------
say "starting postgres and redis"
"$ROOT/scripts/stack.sh" start "$TMP/stack" 2>>"$TMP/stack.log" ||
    die "scripts/stack.sh failed: $(tail -n 20 "$TMP/stack.log")"
# shellcheck disable=SC1091
. "$TMP/stack/env"
# redis-cli below authenticates as the stack's default user (by environment:
# no password on a command line).
export REDISCLI_AUTH=$REDIS_PASSWORD
ADMIN_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
FINANCE_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
KEY_PEPPER=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
BILLING_PORT=$(free_port)
export DATABASE_URL REDIS_URL ADMIN_TOKEN FINANCE_TOKEN KEY_PEPPER
export BILLING_LISTEN=127.0.0.1:$BILLING_PORT LOG_LEVEL=warn
"$ROOT/bin/billing" migrate >"$TMP/migrate.log" 2>&1 || die "billing migrate: $(cat "$TMP/migrate.log")"
spawn billing "$BILLING_PORT" "$ROOT/bin/billing" serve
BILLING_PID=$SPAWNED

cat >"$TMP/routes.json" <<'EOF'
{"charge_on": ["2xx", "3xx"], "routes": [{"id": "bench", "method": "GET", "path": "/**", "price": 1}]}
EOF

admin() { # METHOD PATH [JSON] -> body; dies unless 2xx
    local out status args=(-sS -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN" -w '\n%{http_code}' --max-time 10)
    [ -n "${3:-}" ] && args+=(-H 'Content-Type: application/json' --data "$3")
    out=$(curl "${args[@]}" "http://$BILLING_LISTEN$2") || die "admin API: $1 $2 failed"
    status=${out##*$'\n'}
    out=${out%$'\n'*}
    [[ $status == 2?? ]] || die "admin API: $1 $2 answered $status: $out"
    printf '%s' "$out"
}
ACCT=$(admin POST /v1/accounts '{"name":"bench"}' | jq -er .id) || die "no account id"
admin POST "/v1/accounts/$ACCT/topups" '{"amount":1000000000,"reference":"bench-seed"}' >/dev/null
API_KEY=$(admin POST "/v1/accounts/$ACCT/keys" | jq -er .api_key) || die "no api key"
AUTH="Authorization: Bearer $API_KEY"

start_gateway() { # [VAR=VALUE...]: sets GW_PID, GW_PORT and GW_OPS (its ops address)
    GW_PORT=$(free_port)
    GW_OPS=127.0.0.1:$(free_port)
    # The gateway as in production: its own Redis ACL user and Postgres role.
    spawn gateway "$GW_PORT" env GATEWAY_LISTEN="127.0.0.1:$GW_PORT" GATEWAY_OPS_LISTEN="$GW_OPS" \
        REDIS_URL="$GATEWAY_REDIS_URL" DATABASE_URL="$GATEWAY_DATABASE_URL" \
        UPSTREAM_URL="http://127.0.0.1:$UP_PORT" ROUTES_FILE="$TMP/routes.json" \
        GATEWAY_THREADS="$GW_THREADS" MAX_CONNECTIONS=$((MANY + 1024)) "$@" "$ROOT/bin/gateway"
    GW_PID=$SPAWNED
    # One call through: the key, the route and the upstream all work.
    local status
    status=$(curl -s -o "$TMP/probe.txt" -w '%{http_code}' -H "$AUTH" "http://127.0.0.1:$GW_PORT$BENCH_PATH")
    [ "$status" = 200 ] || die "gateway probe answered $status: $(cat "$TMP/probe.txt")"
}
start_gateway

# ---- the many-accounts scenario: 1,000 accounts, each with its own key ------------
# 900 small accounts of BENCH_MANY_SMALL_POINTS (1,000) points, too few for
# a lease (gateway/lease.c wants room for 4 x GATEWAY_LEASE_CALLS calls):
# every call holds and settles its price per call; 100 large ones served
# from leases. Half the calls go to each group, keys drawn at random per
# request (scripts/bench-many.lua).
MANY_ACCTS=${BENCH_MANY_ACCOUNTS:-1000}
MANY_SMALL=$((MANY_ACCTS * 9 / 10))
SMALL_POINTS=${BENCH_MANY_SMALL_POINTS:-1000}
make_many_account() { # I: prints "small|large KEY ACCOUNT_ID"
    local i=$1 id key pts=1000000000 kind=large
    [ "$i" -le "$MANY_SMALL" ] && pts=$SMALL_POINTS kind=small
    id=$(admin POST /v1/accounts "{\"name\":\"many-$i\"}" | jq -er .id) || exit 1
    admin POST "/v1/accounts/$id/topups" "{\"amount\":$pts,\"reference\":\"many-$i\"}" >/dev/null || exit 1
    key=$(admin POST "/v1/accounts/$id/keys" | jq -er .api_key) || exit 1
    echo "$kind $key $id"
}
export -f make_many_account admin die say
export MANY_SMALL SMALL_POINTS
say "creating $MANY_ACCTS accounts and keys for the many-accounts scenario"
seq 1 "$MANY_ACCTS" | xargs -P 8 -I{} bash -c 'make_many_account {}' >"$TMP/many-keys.txt" ||
    die "creating the many-accounts scenario's accounts failed"
[ "$(wc -l <"$TMP/many-keys.txt")" = "$MANY_ACCTS" ] || die "not every many-accounts key was made"
export BENCH_MANY_KEYS=$TMP/many-keys.txt
MANY_IDS=$(awk '{ print $3 }' "$TMP/many-keys.txt" | paste -sd, -)
many_spent() { psql "$DATABASE_URL" -Atqc "select coalesce(sum(spent), 0) from accounts where id in ($MANY_IDS)"; }
many_spent_before=$(many_spent)

# ---- the runs --------------------------------------------------------------------
# The proxy's own CPU per call, to set beside the gateway's.
nginx_ticks() {
    echo "$(ticks_of $(pgrep -f "nginx: worker process" -P "$PROXY_PID" 2>/dev/null))" \
        "$(ticks_of $(pgrep -f "nginx: worker process" -P "$UPSTREAM_PID" 2>/dev/null))"
}
# Adds the differences of two tick lists to the running totals in the array named $1.
add_ticks() {
    local -n acc=$1
    local -a b=($2) a=($3)
    local i
    for i in "${!a[@]}"; do acc[i]=$((${acc[i]:-0} + a[i] - b[i])); done
}
spent_redis() { redis-cli -p "$REDIS_PORT_STACK" --raw HGET "pg:{$ACCT}:acct" spent; }

# Where Redis's time goes in a run: its command statistics (commands run
# inside scripts are counted too) in build/bench/redis-stats-LABEL.txt.
redis_stats_reset() { redis-cli -p "$REDIS_PORT_STACK" CONFIG RESETSTAT >/dev/null; }
redis_stats() {
    redis-cli -p "$REDIS_PORT_STACK" INFO commandstats | tr -d '\r' | grep '^cmdstat_' |
        sed 's/^cmdstat_//' | sort -t= -k2 >"$OUT/redis-stats-$1.txt"
}
run_wrk upstream "http://127.0.0.1:$UP_PORT$BENCH_PATH" "$CONNS" "$AUTH"
spent_before=$(spent_redis)
spent_before=${spent_before:-0}
# Interleaved rounds: this machine's speed drifts over a minute (shared
# cores, other tenants), so nginx and the gateway take turns and the report
# uses each one's median round; the ratio is that of the medians.
px_ticks=() gw_ticks=() many_ticks=()
for round in $(seq 1 "$ROUNDS"); do
    b=$(nginx_ticks)
    run_wrk "nginx-proxy-$round" "http://127.0.0.1:$PROXY_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    add_ticks px_ticks "$b" "$(nginx_ticks)"
    b=$(cpu_ticks)
    redis_stats_reset
    run_wrk "gateway-$round" "http://127.0.0.1:$GW_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    add_ticks gw_ticks "$b" "$(cpu_ticks)"
    redis_stats "gateway-$round"
    b=$(cpu_ticks)
    redis_stats_reset
    WRK_SCRIPT="$ROOT/scripts/bench-many.lua" \
        run_wrk "many-accounts-$round" "http://127.0.0.1:$GW_PORT$BENCH_PATH" "$CONNS"
    add_ticks many_ticks "$b" "$(cpu_ticks)"
    redis_stats "many-accounts-$round"
    # Steady state: the same load again and again on the same gateway; its
    # resident memory after the last round must not exceed the first's by
    # more than noise.
    [ "$round" = 1 ] && rss_first=$(vmrss_kb "$GW_PID")
done
rss_last=$(vmrss_kb "$GW_PID")
wrk_end=$(date +%s%N)
GW_RSS_KB=$(vmhwm_kb "$GW_PID")

# The median round of LABEL (by requests/s): its wrk output is copied to
# wrk-LABEL.txt, which the report reads. Sums requests and non-2xx of all
# rounds into LABEL_reqs_all / LABEL_non2xx_all.
median_round() {
    local label=$1 r rps line best
    local -a rows=()
    for r in $(seq 1 "$ROUNDS"); do
        read -r rps _ _ reqs non2xx _ < <(wrk_figures "$OUT/wrk-$label-$r.txt")
        rows+=("$rps $r $reqs $non2xx")
    done
    best=$(printf '%s\n' "${rows[@]}" | sort -n | sed -n "$(((ROUNDS + 1) / 2))p" | awk '{ print $2 }')
    cp "$OUT/wrk-$label-$best.txt" "$OUT/wrk-$label.txt"
    printf '%s\n' "${rows[@]}" | awk '{ q += $3; n += $4; printf "%s%s", (NR > 1 ? " " : ""), $1 }
        END { printf "\n%d %d\n", q, n }'
}
{ read -r px_rounds; read -r px_reqs _; } < <(median_round nginx-proxy)
{ read -r gw_rounds; read -r gw_reqs gw_non2xx; } < <(median_round gateway)
{ read -r many_rounds; read -r many_reqs many_non2xx; } < <(median_round many-accounts)
read -r px_rps_med _ < <(wrk_figures "$OUT/wrk-nginx-proxy.txt")

# Settlement lag: until the outbox is empty and Postgres agrees with Redis
# on what was spent. Then, apart, until nothing is held: the gateway's
# point lease goes back after GATEWAY_LEASE_IDLE_MS without calls (it holds
# points, it charges nothing), so this one is about that setting.
lag_ms=timeout
idle_ms=timeout
drain_deadline=$(($(date +%s) + ${BENCH_DRAIN_TIMEOUT:-120}))
while [ "$(date +%s)" -le "$drain_deadline" ]; do
    xlen=$(redis-cli -p "$REDIS_PORT_STACK" --raw XLEN pg:outbox)
    held=$(redis-cli -p "$REDIS_PORT_STACK" --raw HGET "pg:{$ACCT}:acct" held)
    rspent=$(spent_redis)
    rspent=${rspent:-0}
    pspent=$(psql "$DATABASE_URL" -Atqc "select spent from accounts where id = $ACCT")
    if [ "$lag_ms" = timeout ] && [ "$xlen" = 0 ] && [ "$rspent" = "$pspent" ]; then
        lag_ms=$((($(date +%s%N) - wrk_end) / 1000000))
    fi
    if [ "$lag_ms" != timeout ] && [ "${held:-0}" = 0 ]; then
        idle_ms=$((($(date +%s%N) - wrk_end) / 1000000))
        break
    fi
    sleep 0.02
done
[ "$idle_ms" != timeout ] ||
    say "warning: not drained after ${BENCH_DRAIN_TIMEOUT:-120} s (XLEN $xlen, held $held, redis spent $rspent, postgres spent $pspent)"

read -r gw_rps _ gw_p99 _ < <(wrk_figures "$OUT/wrk-gateway.txt")
cpu_report=$(awk -v n="$gw_reqs" -v hz="$(getconf CLK_TCK)" -v g="${gw_ticks[0]}" \
    -v r="${gw_ticks[1]}" -v p="${gw_ticks[2]}" -v b="${gw_ticks[3]}" -v u="${gw_ticks[4]}" \
    'BEGIN { f = (n > 0 ? 1e6 / hz / n : 0)
             printf "gateway %.1f, redis %.1f, postgres %.1f, billing %.1f, upstream nginx %.1f",
                    g * f, r * f, p * f, b * f, u * f }')
px_cpu_report=$(awk -v n="$px_reqs" -v hz="$(getconf CLK_TCK)" -v x="${px_ticks[0]}" \
    -v u="${px_ticks[1]}" -v g="${gw_ticks[0]}" -v gn="$gw_reqs" \
    'BEGIN { f = (n > 0 ? 1e6 / hz / n : 0); fg = (gn > 0 ? 1e6 / hz / gn : 0)
             printf "nginx proxy %.1f, upstream nginx %.1f; gateway / nginx proxy: %.2fx",
                    x * f, u * f, (x > 0 ? (g * fg) / (x * f) : 0) }')
# CPU per call of each process (us) from tick totals T (gateway redis
# postgres billing upstream) over N calls; then the whole billing path
# (gateway + Redis + Postgres + billing) against the nginx proxy's own.
cpu_line() { # N T0 T1 T2 T3 T4
    awk -v n="$1" -v hz="$(getconf CLK_TCK)" -v g="$2" -v r="$3" -v p="$4" -v b="$5" -v u="$6" \
        -v xn="$px_reqs" -v x="${px_ticks[0]}" \
        'BEGIN { f = (n > 0 ? 1e6 / hz / n : 0); fx = (xn > 0 ? 1e6 / hz / xn : 0)
                 printf "gateway %.1f, redis %.1f, postgres %.1f, billing %.1f, upstream nginx %.1f; billing path %.1f = %.2fx nginx proxy",
                        g * f, r * f, p * f, b * f, u * f, (g + r + p + b) * f,
                        (x > 0 ? (g + r + p + b) * f / (x * fx) : 0) }'
}
path_report=$(cpu_line "$gw_reqs" "${gw_ticks[@]}")
many_cpu_report=$(cpu_line "$many_reqs" "${many_ticks[@]}")
read -r many_rps _ many_p99 _ < <(wrk_figures "$OUT/wrk-many-accounts.txt")
many_ratio=$(awk -v a="$many_rps" -v b="$px_rps_med" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
many_vs_single=$(awk -v a="$many_rps" -v b="$gw_rps" 'BEGIN { printf "%+.1f", (b > 0 ? (a / b - 1) * 100 : 0) }')
charged_many=$(($(many_spent) - many_spent_before))
served_many_2xx=$((many_reqs - many_non2xx))
charged=$((rspent - spent_before))
served_2xx=$((gw_reqs - gw_non2xx))

# ---- what operations cost: /metrics scraped every second, then the access log --
# Interleaved rounds again, on the same numbers of workers: the gateway as
# above (plain), the same gateway while a scraper reads its /metrics every
# second (what Prometheus does), and a second gateway writing the access log
# to a file (ACCESS_LOG) while it is scraped too. Targets: within 3% and 8%.
ACCESS_FILE="$TMP/access.log"
PLAIN_PID=$GW_PID PLAIN_PORT=$GW_PORT PLAIN_OPS=$GW_OPS
start_gateway ACCESS_LOG="$ACCESS_FILE"
ALOG_PID=$GW_PID ALOG_PORT=$GW_PORT ALOG_OPS=$GW_OPS
scraper() { # OPS_ADDR: scrapes every second until killed; counts good scrapes
    while :; do
        curl -sf --max-time 2 -o /dev/null "http://$1/metrics" && echo ok >>"$TMP/scrapes.txt"
        sleep 1
    done
}
: >"$TMP/scrapes.txt"
OPS_ROUNDS=${BENCH_OPS_ROUNDS:-$ROUNDS}
for round in $(seq 1 "$OPS_ROUNDS"); do
    run_wrk "ops-plain-$round" "http://127.0.0.1:$PLAIN_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    scraper "$PLAIN_OPS" &
    SCRAPER=$!
    PIDS+=("$SCRAPER")
    run_wrk "ops-metrics-$round" "http://127.0.0.1:$PLAIN_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    stop_pid "$SCRAPER"
    scraper "$ALOG_OPS" &
    SCRAPER=$!
    PIDS+=("$SCRAPER")
    run_wrk "ops-access-$round" "http://127.0.0.1:$ALOG_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    stop_pid "$SCRAPER"
    # One line per call answered (wrk's count, give or take the calls in
    # flight at its end); fewer with lines dropped, which the report shows.
    access_lines=$(wc -l <"$ACCESS_FILE" 2>/dev/null || echo 0)
    [ -f "$ACCESS_FILE" ] && : >"$ACCESS_FILE" # appended to (O_APPEND): truncating keeps /tmp small
done
{ read -r ops_plain_rounds; read -r _; } < <(ROUNDS=$OPS_ROUNDS median_round ops-plain)
{ read -r ops_metrics_rounds; read -r _; } < <(ROUNDS=$OPS_ROUNDS median_round ops-metrics)
{ read -r ops_access_rounds; read -r ops_access_reqs _; } < <(ROUNDS=$OPS_ROUNDS median_round ops-access)
read -r ops_plain_rps _ < <(wrk_figures "$OUT/wrk-ops-plain.txt")
read -r ops_metrics_rps _ < <(wrk_figures "$OUT/wrk-ops-metrics.txt")
read -r ops_access_rps _ < <(wrk_figures "$OUT/wrk-ops-access.txt")
metrics_cost=$(awk -v a="$ops_metrics_rps" -v b="$ops_plain_rps" 'BEGIN { printf "%+.1f", (b > 0 ? (a / b - 1) * 100 : 0) }')
access_cost=$(awk -v a="$ops_access_rps" -v b="$ops_plain_rps" 'BEGIN { printf "%+.1f", (b > 0 ? (a / b - 1) * 100 : 0) }')
scrapes=$(wc -l <"$TMP/scrapes.txt")
access_dropped=$(curl -sf "http://$ALOG_OPS/metrics" | awk '$1 ~ /^pointgate_log_lines_dropped_total\{sink="access"\}/ { print $2 }')
stop_pid "$ALOG_PID"
GW_PID=$PLAIN_PID

# ---- the developer contract: rate limit and cap on the bench route ----------------
# Interleaved rounds of the plain gateway and a second gateway whose bench
# route has a rate limit (per key: 10^6 calls a second, so that none is
# refused) and whose account has a rate limit and a daily cap far above what
# the run spends: every call meets every check, none is refused. A limited
# call is never served from a lease (README "Rate limits and spending caps"),
# so this compares leased calls with per-call reserve and settle scripts.
# Target (issue 12): within 5% of plain.
LACCT=$(admin POST /v1/accounts '{"name":"bench-limited"}' | jq -er .id) || die "no account id"
admin POST "/v1/accounts/$LACCT/topups" '{"amount":1000000000,"reference":"bench-seed-limited"}' >/dev/null
admin PUT "/v1/accounts/$LACCT/limits" \
    '{"rate":{"quota":1000000,"window_s":1},"daily_cap":1000000000000,"monthly_cap":1000000000000}' >/dev/null
LKEY=$(admin POST "/v1/accounts/$LACCT/keys" | jq -er .api_key) || die "no api key"
LAUTH="Authorization: Bearer $LKEY"
cat >"$TMP/routes-limited.json" <<'XEOF2'
{"charge_on": ["2xx", "3xx"], "routes": [{"id": "bench", "method": "GET", "path": "/**", "price": 1,
 "rate": {"quota": 1000000, "window_s": 1}},
 {"id": "bench-post", "method": "POST", "path": "/**", "price": 1,
 "rate": {"quota": 1000000, "window_s": 1}, "idempotency": "required"}]}
XEOF2
# The plain gateway of the ops rounds (PLAIN_PID, PLAIN_PORT) is the reference.
AUTH_SAVED=$AUTH
AUTH=$LAUTH
# A short IDEMPOTENCY_TTL and a large budget: every call of the run stores
# its answer, and none may be refused for the budget.
start_gateway ROUTES_FILE="$TMP/routes-limited.json" IDEMPOTENCY_TTL=300 \
    IDEMPOTENCY_ACCOUNT_BYTES=$((512 << 20))
AUTH=$AUTH_SAVED
LIM_PID=$GW_PID LIM_PORT=$GW_PORT
# The same calls without limits and without leases: how much of the gap is
# the per-call scripts rather than the limit checks in them.
start_gateway GATEWAY_LEASE_CALLS=0
PERCALL_PID=$GW_PID PERCALL_PORT=$GW_PORT
LIM_ROUNDS=${BENCH_LIMITS_ROUNDS:-$ROUNDS}
for round in $(seq 1 "$LIM_ROUNDS"); do
    run_wrk "contract-plain-$round" "http://127.0.0.1:$PLAIN_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    run_wrk "contract-limited-$round" "http://127.0.0.1:$LIM_PORT$BENCH_PATH" "$CONNS" "$LAUTH"
    run_wrk "contract-percall-$round" "http://127.0.0.1:$PERCALL_PORT$BENCH_PATH" "$CONNS" "$AUTH"
    # The same limited route's POST twin, each call with its own key.
    WRK_SCRIPT="$ROOT/scripts/bench-idem.lua" \
        run_wrk "contract-idem-$round" "http://127.0.0.1:$LIM_PORT$BENCH_PATH" "$CONNS" "$LAUTH"
done
{ read -r idem_rounds; read -r _; } < <(ROUNDS=$LIM_ROUNDS median_round contract-idem)
read -r idem_rps _ idem_p99 _ idem_non2xx _ < <(wrk_figures "$OUT/wrk-contract-idem.txt")
{ read -r percall_rounds; read -r _; } < <(ROUNDS=$LIM_ROUNDS median_round contract-percall)
read -r percall_rps _ < <(wrk_figures "$OUT/wrk-contract-percall.txt")
stop_pid "$PERCALL_PID"
{ read -r lim_plain_rounds; read -r _; } < <(ROUNDS=$LIM_ROUNDS median_round contract-plain)
{ read -r lim_rounds; read -r _; } < <(ROUNDS=$LIM_ROUNDS median_round contract-limited)
read -r lim_plain_rps _ lim_plain_p99 _ < <(wrk_figures "$OUT/wrk-contract-plain.txt")
read -r lim_rps _ lim_p99 _ lim_non2xx _ < <(wrk_figures "$OUT/wrk-contract-limited.txt")
lim_cost=$(awk -v a="$lim_rps" -v b="$lim_plain_rps" 'BEGIN { printf "%+.1f", (b > 0 ? (a / b - 1) * 100 : 0) }')
percall_cost=$(awk -v a="$percall_rps" -v b="$lim_plain_rps" 'BEGIN { printf "%+.1f", (b > 0 ? (a / b - 1) * 100 : 0) }')
idem_cost=$(awk -v a="$idem_rps" -v b="$lim_plain_rps" 'BEGIN { printf "%+.1f", (b > 0 ? (a / b - 1) * 100 : 0) }')
stop_pid "$LIM_PID"
GW_PID=$PLAIN_PID

# ---- 1,000 open connections, on a fresh gateway so its peak is this run's ------
stop_pid "$GW_PID"
start_gateway
run_wrk "gateway-c$MANY" "http://127.0.0.1:$GW_PORT$BENCH_PATH" "$MANY" "$AUTH"
GW_MANY_RSS_KB=$(vmhwm_kb "$GW_PID")

# ---- the report ----------------------------------------------------------------------
read -r px_rps _ px_p99 _ < <(wrk_figures "$OUT/wrk-nginx-proxy.txt")
ratio=$(awk -v a="$gw_rps" -v b="$px_rps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
p99_ratio=$(awk -v a="$(to_us "$gw_p99")" -v b="$(to_us "$px_p99")" \
    'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
# Calls in flight when wrk stopped may be charged without wrk counting them:
# at most one per connection and round. Fewer charges than 2xx answers is a bug.
check=MISMATCH
if [ "$charged" -ge "$served_2xx" ] && [ "$charged" -le $((served_2xx + CONNS * ROUNDS)) ]; then
    check=ok
fi
{
    printf '\n%-14s %12s %10s %10s %10s %14s\n' target "requests/s" p50 p99 non-2xx "socket errors"
    for label in upstream nginx-proxy gateway many-accounts "gateway-c$MANY"; do
        read -r rps p50 p99 reqs non2xx errs < <(wrk_figures "$OUT/wrk-$label.txt")
        printf '%-14s %12s %10s %10s %10s %14s\n' "$label" "$rps" "$p50" "$p99" "$non2xx" "$errs"
        record "${label}_rps" "$rps"
        record "${label}_p50" "$p50"
        record "${label}_p99" "$p99"
        record "${label}_requests" "$reqs"
        record "${label}_non2xx" "$non2xx"
        record "${label}_socket_errors" "$errs"
    done
    echo
    echo "workers per proxy: $WORKERS (nginx worker_processes $WORKERS, GATEWAY_THREADS=$GW_THREADS; BENCH_WORKERS)"
    echo "rounds (requests/s): nginx-proxy $px_rounds; gateway $gw_rounds (median of $ROUNDS shown)"
    echo "gateway / nginx-proxy: ${ratio}x the requests/s, ${p99_ratio}x the p99"
    echo "CPU per gateway call (us, user+sys, during the -c$CONNS run): $cpu_report"
    echo "CPU per nginx-proxy call (us, user+sys): $px_cpu_report"
    echo "  the gateway's whole billing path per call: $path_report"
    echo "many-accounts ($MANY_ACCTS accounts and keys, $MANY_SMALL of $SMALL_POINTS points on per-call holds, the rest leased; keys drawn per request):"
    echo "  $many_rps requests/s ($many_rounds), p99 $many_p99, ${many_ratio}x nginx-proxy, ${many_vs_single}% against the single account"
    echo "  CPU per call (us): $many_cpu_report"
    many_check=MISMATCH
    if [ "$charged_many" -ge "$served_many_2xx" ] && [ "$charged_many" -le $((served_many_2xx + CONNS * ROUNDS)) ]; then
        many_check=ok
    fi
    echo "  charged: $charged_many points for $served_many_2xx 2xx answers (non-2xx $many_non2xx): $many_check"
    echo "gateway peak RSS (-c$CONNS): $((GW_RSS_KB / 1024)) MiB ($GW_RSS_KB kB)"
    echo "gateway RSS after round 1: $rss_first kB, after round $ROUNDS: $rss_last kB (growth $((rss_last - rss_first)) kB)"
    echo "settlement lag after wrk's end: ${lag_ms} ms (outbox drained, Postgres spent = Redis spent)"
    echo "nothing held after wrk's end: ${idle_ms} ms (the idle lease given back)"
    echo "charged: $charged points for $served_2xx 2xx answers counted by wrk: $check"
    echo "operations cost (requests/s, medians of $OPS_ROUNDS interleaved rounds): plain $ops_plain_rps ($ops_plain_rounds);"
    echo "  /metrics scraped every second $ops_metrics_rps ($ops_metrics_rounds): ${metrics_cost}% (target within 3%)"
    echo "  access log to a file, scraped too $ops_access_rps ($ops_access_rounds): ${access_cost}% (target within 8%)"
    echo "  $scrapes scrapes answered; access log lines in the last round: $access_lines, dropped in all: ${access_dropped:-?}"
    echo "developer contract (requests/s, medians of $LIM_ROUNDS interleaved rounds): plain $lim_plain_rps ($lim_plain_rounds);"
    echo "  rate limit (route and account) and daily cap on every call $lim_rps ($lim_rounds): ${lim_cost}% (target within 5%), p99 $lim_p99 vs $lim_plain_p99, non-2xx $lim_non2xx"
    echo "  no limits, no leases (GATEWAY_LEASE_CALLS=0) $percall_rps ($percall_rounds): ${percall_cost}%"
    echo "  rate limits, cap and a new Idempotency-Key on every call (POST) $idem_rps ($idem_rounds): ${idem_cost}%, p99 $idem_p99, non-2xx $idem_non2xx"
    verdict=ok
    [ "$GW_MANY_RSS_KB" -le "$RSS_TARGET_KB" ] || verdict="OVER the 64 MiB target"
    echo "gateway peak RSS with $MANY connections: $((GW_MANY_RSS_KB / 1024)) MiB ($GW_MANY_RSS_KB kB): $verdict"
} | tee "$OUT/report.txt"
record cpu_us_per_gateway_call "$cpu_report"
record cpu_us_per_nginx_proxy_call "$px_cpu_report"
record cpu_us_billing_path_single "$path_report"
record cpu_us_per_many_accounts_call "$many_cpu_report"
record many_accounts_ratio_over_nginx_proxy "$many_ratio"
record many_accounts_vs_single_pct "$many_vs_single"
record many_accounts_charged "$charged_many"
record many_accounts_2xx "$served_many_2xx"
record ratio_rps_gateway_over_nginx_proxy "$ratio"
record ratio_p99_gateway_over_nginx_proxy "$p99_ratio"
record gateway_peak_rss_kb "$GW_RSS_KB"
record settlement_lag_ms "$lag_ms"
record held_zero_ms "$idle_ms"
record gateway_charged_points "$charged"
record gateway_2xx_by_wrk "$served_2xx"
record gateway_charge_check "$check"
record ops_plain_rps "$ops_plain_rps"
record ops_metrics_rps "$ops_metrics_rps"
record ops_access_rps "$ops_access_rps"
record ops_metrics_cost_pct "$metrics_cost"
record ops_access_cost_pct "$access_cost"
record ops_access_dropped_lines "${access_dropped:-}"
record contract_plain_rps "$lim_plain_rps"
record contract_limited_rps "$lim_rps"
record contract_limited_cost_pct "$lim_cost"
record contract_percall_rps "$percall_rps"
record contract_percall_cost_pct "$percall_cost"
record contract_idem_rps "$idem_rps"
record contract_idem_cost_pct "$idem_cost"
record contract_idem_non2xx "$idem_non2xx"
record "gateway_c${MANY}_peak_rss_kb" "$GW_MANY_RSS_KB"
record gateway_rss_after_round1_kb "$rss_first"
record gateway_rss_after_last_round_kb "$rss_last"
record rss_target_kb "$RSS_TARGET_KB"
say "raw figures in ${OUT#"$ROOT"/}/results.txt"
