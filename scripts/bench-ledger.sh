#!/usr/bin/env bash
# The charges table before and after partitioning (make bench-ledger).
#
# Two databases in one throwaway Postgres, in the same run: "before" has
# the schema up to migration 010 (one unpartitioned table, text primary
# key), "after" every migration (daily partitions keyed by the reservation
# id's time, schema/011). Into each, CHARGES rows (default 1,000,000) over
# DAYS days (default 10) go in batches of 2,000 with settlement's own
# INSERT ... ON CONFLICT DO NOTHING (billing/ledger.c), in ROUNDS interleaved
# rounds; then it reports per call: insert time (median round), table and
# index bytes per million rows, and the time to find one charge by request
# id (LOOKUPS random ids): with the partition key from the id (what GET
# /v1/charges/{id} does) and without it (every partition probed).
set -euo pipefail
cd "$(dirname "$0")/.."
CHARGES=${CHARGES:-1000000}
DAYS=${DAYS:-10}
ROUNDS=${ROUNDS:-3}
LOOKUPS=${LOOKUPS:-20000}
BATCH=2000
dir=$(mktemp -d /tmp/pointgate-bench-ledger.XXXXXX)
cleanup() {
    scripts/stack.sh stop "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
scripts/stack.sh start "$dir" >/dev/null 2>&1
# shellcheck disable=SC1091
. "$dir/env"
base=${DATABASE_URL%/*}
q() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }
for db in before after; do
    q "$base/postgres" -c "CREATE DATABASE bench_$db"
done
DATABASE_URL=$base/bench_before bin/billing migrate --to 10 >/dev/null
DATABASE_URL=$base/bench_after bin/billing migrate >/dev/null
start_ms=$(( ($(date +%s) / 86400 - DAYS + 1) * 86400000 ))
span=$(( DAYS * 86400000 / CHARGES ))
for db in before after; do
    q "$base/bench_$db" -c "INSERT INTO accounts (name, credited) SELECT 'b-' || g, 9000000000000 FROM generate_series(1, 1000) g"
done
q "$base/bench_after" -c "SELECT charges_ensure_partitions((to_timestamp($start_ms / 1000) AT TIME ZONE 'UTC')::date, (now() AT TIME ZONE 'UTC')::date)" >/dev/null

# fill DB FROM TO: rows FROM..TO-1 in batches, one statement each, as
# settlement sends them (the partition key computed from the id by billing,
# ledger_reserved_ms, as here); prints the milliseconds it took.
fill() {
    local db=$1 from=$2 to=$3 conflict key
    if [ "$db" = before ]; then
        conflict="(reservation_id)"; key=""
    else
        conflict="(reservation_id, reserved_at)"; key=", to_timestamp(ms / 1000.0)"
    fi
    q "$base/bench_$db" <<SQL
\\timing on
DO \$\$
DECLARE b bigint := $from;
BEGIN
  WHILE b < $to LOOP
    INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status,
                         occurred_at$( [ "$db" = after ] && echo ", reserved_at"))
    SELECT rid, 1 + g % 1000, 'route.' || (g % 5), 1 + g % 5, 5, 'commit', 200,
           to_timestamp(ms / 1000.0)$key
      FROM (SELECT g, $start_ms + g * $span AS ms,
                   lpad(to_hex($start_ms + g * $span), 12, '0') || substr(md5(g::text), 1, 20) AS rid
              FROM generate_series(b, least(b + $BATCH, $to) - 1) g) s
    ON CONFLICT $conflict DO NOTHING;
    b := b + $BATCH;
  END LOOP;
END \$\$;
SQL
}
per=$(( (CHARGES + ROUNDS - 1) / ROUNDS ))
declare -A t
for round in $(seq 1 "$ROUNDS"); do
    for db in before after; do
        from=$(( (round - 1) * per )); to=$(( round * per ))
        ms=$(fill "$db" "$from" "$to" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
        t[$db,$round]=$ms
    done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rows=$(( per * ROUNDS ))
declare -A ins size idx look lookall
for db in before after; do
    vals=()
    for round in $(seq 1 "$ROUNDS"); do vals+=("${t[$db,$round]}"); done
    ins[$db]=$(median "${vals[@]}")
    q "$base/bench_$db" -c "VACUUM ANALYZE charges"
    read -r size[$db] idx[$db] < <(q "$base/bench_$db" -F ' ' -c "
        SELECT sum(pg_table_size(relid)), sum(pg_indexes_size(relid))
          FROM (SELECT 'charges'::regclass AS relid WHERE (SELECT relkind FROM pg_class WHERE relname = 'charges') = 'r'
                UNION ALL SELECT relid FROM pg_partition_tree('charges') WHERE isleaf) s")
    if [ "$db" = before ]; then
        where="reservation_id = %L"
    else
        where="reservation_id = %1\$L AND reserved_at = charges_reserved_at(%1\$L)"
    fi
    # LOOKUPS ids drawn from the table, looked up one by one, each planned
    # with its id as the API's query is (an unnamed statement: the
    # partition is chosen when planning).
    lookup() {
        q "$base/bench_$db" <<SQL | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
CREATE TEMP TABLE ids AS SELECT reservation_id AS r FROM charges TABLESAMPLE SYSTEM (5) LIMIT $LOOKUPS;
\\timing on
DO \$\$
DECLARE r text; n int := 0; c int;
BEGIN
  FOR r IN SELECT ids.r FROM ids LOOP
    EXECUTE format('SELECT 1 FROM charges WHERE $1', r);
    GET DIAGNOSTICS c = ROW_COUNT;
    n := n + c;
  END LOOP;
  IF n <> (SELECT count(*) FROM ids) THEN RAISE EXCEPTION 'lookup: % of % found', n, (SELECT count(*) FROM ids); END IF;
END \$\$;
SQL
    }
    look[$db]=$(lookup "$where")
    [ "$db" = after ] && lookall[$db]=$(lookup "reservation_id = %L")
done
parts=$(q "$base/bench_after" -c "SELECT count(*) FROM pg_partition_tree('charges') WHERE isleaf")
# What a day costs once exported (billing/archive.c writes the same COPY, gzip level 6).
read -r big big_rows < <(q "$base/bench_after" -F ' ' -c "
    SELECT c.tableoid::regclass, count(*) FROM charges c GROUP BY 1 ORDER BY 2 DESC LIMIT 1")
gz_bytes=$(q "$base/bench_after" -c "COPY $big TO STDOUT WITH (FORMAT csv, HEADER true)" | gzip -6 | wc -c)
echo
printf 'charges table, %d rows over %d days, batches of %d (%d interleaved rounds)\n' "$rows" "$DAYS" "$BATCH" "$ROUNDS"
printf '%-46s %14s %14s %8s\n' "" "unpartitioned" "partitioned" "ratio"
awk -v a="${ins[before]}" -v b="${ins[after]}" -v n="$per" 'BEGIN { printf "%-46s %14.2f %14.2f %7.2fx\n", "insert, us per call (median round)", a * 1000 / n, b * 1000 / n, b / a }'
awk -v a="${size[before]}" -v b="${size[after]}" -v n="$rows" 'BEGIN { printf "%-46s %14.1f %14.1f %7.2fx\n", "table, MiB per million calls", a / n * 1e6 / 1048576, b / n * 1e6 / 1048576, b / a }'
awk -v a="${idx[before]}" -v b="${idx[after]}" -v n="$rows" 'BEGIN { printf "%-46s %14.1f %14.1f %7.2fx\n", "index, MiB per million calls", a / n * 1e6 / 1048576, b / n * 1e6 / 1048576, b / a }'
awk -v g="$gz_bytes" -v n="$big_rows" 'BEGIN { printf "%-46s %14s %14.1f\n", "archive file (gzip CSV), MiB per million calls", "", g / n * 1e6 / 1048576 }'
awk -v a="${look[before]}" -v b="${look[after]}" -v n="$LOOKUPS" 'BEGIN { printf "%-46s %14.1f %14.1f %7.2fx\n", "find one charge by request id, us", a * 1000 / n, b * 1000 / n, b / a }'
awk -v a="${look[before]}" -v b="${lookall[after]}" -v n="$LOOKUPS" -v p="$parts" 'BEGIN { printf "%-46s %14s %14.1f %7.2fx\n", "  the same without the key (" p " partitions)", "", b * 1000 / n, b / a }'
