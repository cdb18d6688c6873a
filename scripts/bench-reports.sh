#!/usr/bin/env bash
# Benchmark of the usage report over 10 million charges (make bench-reports).
#
# Fills a throwaway Postgres with CHARGES charge rows (default 10,000,000)
# spread over 1,000 accounts, 5 routes and 30 days of November 2026, builds
# the daily rollup from them exactly as settlement maintains it, then times
# the report the API serves (rollup) against the same figures aggregated from
# the charge rows (the reference), and checks both agree.
set -euo pipefail
cd "$(dirname "$0")/.."
CHARGES=${CHARGES:-10000000}
dir=$(mktemp -d /tmp/pointgate-bench-reports.XXXXXX)
billing_pid=""
cleanup() {
    [ -n "$billing_pid" ] && kill "$billing_pid" 2>/dev/null && wait "$billing_pid" 2>/dev/null
    scripts/stack.sh stop "$dir" || true
    rm -rf "$dir"
}
trap cleanup EXIT
scripts/stack.sh start "$dir" 2>/dev/null
# shellcheck disable=SC1091
. "$dir/env"
export KEY_PEPPER=bench-pepper-0123456789 FINANCE_TOKEN=bench-finance-0123456789 \
       ADMIN_TOKEN=bench-admin-0123456789 BILLING_LISTEN=127.0.0.1:$((20000 + RANDOM % 20000))
bin/billing migrate >/dev/null
echo "filling $CHARGES charges (1,000 accounts, 5 routes, 30 days)..."
t0=$(date +%s.%N)
psql -q "$DATABASE_URL" -v ON_ERROR_STOP=1 <<SQL
INSERT INTO accounts (name, credited) SELECT 'acct-' || g, 9000000000000 FROM generate_series(1, 1000) g;
-- Partitions of the month (schema/011), then rows whose ids carry their time as the gateway's do.
SELECT charges_ensure_partitions('2026-11-01', '2026-11-30');
INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status, occurred_at,
                     reserved_at)
SELECT lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0') || substr(md5(g::text), 1, 20),
       1 + g % 1000, 'route.' || (g % 5), CASE WHEN g % 50 = 0 THEN 0 ELSE 1 + g % 5 END,
       5, CASE WHEN g % 50 = 0 THEN 'release' ELSE 'commit' END, 200, t, t
FROM (SELECT g, timestamptz '2026-11-01 00:00:00Z' + (g % 2592000) * interval '1 second' AS t
      FROM generate_series(1, $CHARGES) g) s;
INSERT INTO usage_daily (account_id, day, route, calls, points, failed_calls)
SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date, route, count(*), sum(amount),
       count(*) FILTER (WHERE outcome <> 'commit')
FROM charges GROUP BY 1, 2, 3;
UPDATE accounts a SET spent = s.total FROM (SELECT account_id, sum(amount) total FROM charges GROUP BY 1) s
WHERE a.id = s.account_id;
ANALYZE;
SQL
t1=$(date +%s.%N)
printf 'filled in %.0f s\n' "$(echo "$t1 - $t0" | bc)"
bin/billing serve >"$dir/billing.log" 2>&1 &
billing_pid=$!
for _ in $(seq 100); do curl -s "http://$BILLING_LISTEN/healthz" >/dev/null && break; sleep 0.1; done

url="http://$BILLING_LISTEN/v1/reports/usage?from=2026-11-01&to=2026-12-01&group_by=account,route,day"
curl -s -o "$dir/report.json" -H "Authorization: Bearer $FINANCE_TOKEN" "$url"
best=999
for _ in 1 2 3 4 5; do
    t=$(curl -s -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $FINANCE_TOKEN" "$url")
    best=$(echo "if ($t < $best) $t else $best" | bc)
done
ref0=$(date +%s.%N)
ref_totals=$(psql -At "$DATABASE_URL" -c "SELECT count(*), sum(amount), count(*) FILTER (WHERE outcome <> 'commit') FROM (SELECT * FROM charges WHERE occurred_at >= '2026-11-01Z' AND occurred_at < '2026-12-01Z') c")
psql -At "$DATABASE_URL" -c "SELECT account_id, route, (occurred_at AT TIME ZONE 'UTC')::date, count(*), sum(amount) FROM charges WHERE occurred_at >= '2026-11-01Z' AND occurred_at < '2026-12-01Z' GROUP BY 1, 2, 3" >/dev/null
ref1=$(date +%s.%N)
ref=$(echo "$ref1 - $ref0" | bc)
api_totals=$(python3 -c "import json,sys; t=json.load(open('$dir/report.json'))['totals']; print(f\"{t['calls']}|{t['points']}|{t['failed_calls']}\")")
rows=$(python3 -c "import json; print(len(json.load(open('$dir/report.json'))['rows']))")
echo
printf '%-52s %10s\n' "usage report, $CHARGES charges" "seconds"
printf '%-52s %10.3f\n' "API, group_by=account,route,day ($rows rows, best of 5)" "$best"
printf '%-52s %10.3f\n' "reference: same aggregate over the charge rows" "$ref"
printf 'ratio reference/API: %.0fx faster\n' "$(echo "$ref / $best" | bc -l)"
if [ "$api_totals" = "$ref_totals" ]; then
    echo "totals agree: calls|points|failed = $api_totals"
else
    echo "MISMATCH: API $api_totals, charges $ref_totals" >&2
    exit 1
fi
