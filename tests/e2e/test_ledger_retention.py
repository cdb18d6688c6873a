"""A ledger that lasts (schema/011, billing/archive.c, billing/periods.c):
the charges table partitioned by the day of each reservation id, settlement
exactly once across partitions and redeliveries, days past
CHARGE_RETENTION_DAYS exported to ARCHIVE_DIR before they are dropped,
statements that still add up without their per-call rows and never change
once their month is closed, and the migration of an existing unpartitioned
table of a million rows."""
import calendar
import csv
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import time
import uuid

from harness import FINANCE_TOKEN, http
from luahelp import Redis, outbox_add

DAY_MS = 86400 * 1000


def _rid(ms):
    """A reservation id as the gateway makes them: 48-bit ms time, then random."""
    return f"{ms:012x}" + uuid.uuid4().hex[:20]


def _today_ms():
    now = int(time.time() * 1000)
    return now - now % DAY_MS


def _feed(stack, ts, *recs):
    red = Redis(stack.redis_port)
    try:
        outbox_add(red, ts, *recs)
    finally:
        red.close()


def _settled(stack, what="the outbox applied"):
    stack.wait_for(stack.drained, what=what)


def _finance(stack, path):
    return http("GET", stack.admin_url + path, headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})


def _statement(stack, acct, month):
    r = _finance(stack, f"/v1/reports/statement?account={acct}&month={month}")
    assert r.status == 200, r
    return r.json()


def _dead(stack):
    return int(stack.redis_raw("XLEN", "pg:outbox:dead") or 0)


def _spent(stack, acct):
    return int(stack.scalar(f"SELECT spent FROM accounts WHERE id = {acct}"))


def test_charges_are_partitioned_by_the_reservation_day_and_settle_once(stack):
    """Records of three days land in their days' partitions; the same
    records redelivered with other end times (a resent outbox entry, a
    replay) change nothing; a late record upgrades its expire row in its
    own partition; the lookup by request id reads one partition."""
    stack.start_billing()
    acct = stack.new_account(points=1000)[0]
    t0 = _today_ms()
    rids = [_rid(t0 - DAY_MS + 5000), _rid(t0 + 1000), _rid(t0 + DAY_MS + 7000)]
    recs = [(r, acct, "device.read", 3, 3, "commit", 200) for r in rids]
    expire_rid = _rid(t0 + 2000)
    _feed(stack, t0 + 3000, *recs, (expire_rid, acct, "device.read", 0, 4, "expire", 0))
    _settled(stack)
    assert _spent(stack, acct) == 9
    parts = stack.psql("SELECT tableoid::regclass::text, reservation_id FROM charges"
                       f" WHERE account_id = {acct} ORDER BY reserved_at")
    days = [time.strftime("%Y%m%d", time.gmtime((t0 + d * DAY_MS) / 1000)) for d in (-1, 0, 0, 1)]
    assert [p[0] for p in parts] == [f"charges_p{d}" for d in days], parts
    # redelivered, with other end times: nothing twice
    _feed(stack, t0 + 9000, *recs)
    _feed(stack, t0 + 2 * DAY_MS, recs[2], (expire_rid, acct, "device.read", 0, 4, "expire", 0))
    _settled(stack)
    assert _spent(stack, acct) == 9
    assert stack.scalar(f"SELECT count(*) FROM charges WHERE account_id = {acct}") == "4"
    # the spilled settle of the swept call: the expire row becomes (late, 4), once
    for _ in range(2):
        _feed(stack, t0 + 4000, (expire_rid, acct, "device.read", 4, 4, "late", 200))
    _settled(stack)
    assert _spent(stack, acct) == 13
    assert stack.psql(f"SELECT outcome, amount FROM charges WHERE reservation_id = '{expire_rid}'"
                      ) == [["late", "4"]]
    usage = stack.scalar(f"SELECT sum(points) || '/' || sum(calls) || '/' || sum(failed_calls)"
                         f" FROM usage_daily WHERE account_id = {acct}")
    assert usage == "13/4/0", usage
    assert _dead(stack) == 0
    # Rows keyed in SQL (charges_reserved_at: the migration, the lookups)
    # meet the same records keyed by billing (ledger_reserved_ms): one row
    # each, nothing charged again.
    sql_rids = [_rid(t0 + 3000), "legacy-" + uuid.uuid4().hex[:8], _rid(t0 + 4000).upper(),
                _rid(t0 + 5000)[:31]]
    for r in sql_rids:
        stack.psql("INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome,"
                   f" status, occurred_at, reserved_at) VALUES ('{r}', {acct}, 'device.read', 0,"
                   f" 1, 'release', 503, now(), charges_reserved_at('{r}'))")
    _feed(stack, t0 + 6000, *[(r, acct, "device.read", 1, 1, "commit", 200) for r in sql_rids])
    _settled(stack)
    assert _spent(stack, acct) == 13
    keys = stack.psql("SELECT tableoid::regclass::text FROM charges WHERE reservation_id IN ("
                      + ", ".join(f"'{r}'" for r in sql_rids) + ") ORDER BY reservation_id")
    assert sorted(k[0] for k in keys) == sorted(
        ["charges_legacy"] * 3 + ["charges_p" + time.strftime("%Y%m%d", time.gmtime(t0 / 1000))])
    # found by its request id, reading only its day's partition
    r = _finance(stack, f"/v1/charges/{rids[1]}")
    assert r.status == 200, r
    j = r.json()
    assert (j["account_id"], j["amount"], j["outcome"], j["route"]) == (acct, 3, "commit",
                                                                         "device.read")
    plan = "\n".join(x[0] for x in stack.psql(
        f"EXPLAIN SELECT * FROM charges WHERE reservation_id = '{rids[1]}'"
        f" AND reserved_at = charges_reserved_at('{rids[1]}')"))
    assert plan.count(" on charges_p") == 1, plan
    assert _finance(stack, f"/v1/charges/{_rid(t0)}").json()["error"] == "not_found"
    assert _finance(stack, "/v1/charges/" + "x" * 65).status == 400
    # on-call sees the partitions: billing status and the gauges
    st = json.loads(stack.run_billing("status", "--json", check=False).stdout)
    assert st["ledger"]["days_ahead"] >= 13 and st["ledger"]["detached"] == 0, st["ledger"]
    stack.wait_for(lambda: re.search(
        r"^pointgate_billing_charge_partitions_ahead (1[3-9]|[2-9][0-9])$",
        http("GET", stack.billing.ops_url + "/metrics").body.decode(), re.M), what="the gauge")
    p = stack.run_billing("charge", rids[0])
    assert '"amount": 3' in p.stdout
    assert stack.run_billing("charge", _rid(t0), check=False).returncode == 3


def test_retention_exports_each_day_before_dropping_it(stack):
    """Days past CHARGE_RETENTION_DAYS are detached, written to ARCHIVE_DIR
    (gzip'd CSV, every row, its SHA-256 recorded) and only then dropped. A
    failed export leaves the rows in place for the next pass. Statements
    add up as before; a redelivered record of a dropped day goes to the
    dead letter, never charged twice nor lost silently; archived days are
    never made again."""
    stack.start_billing()
    acct = stack.new_account(points=100000)[0]
    t0 = _today_ms()
    month = time.strftime("%Y-%m", time.gmtime(t0 / 1000))
    first_day = time.strftime("%Y-%m-%d", time.gmtime((t0 - 39 * DAY_MS) / 1000))
    last_day = time.strftime("%Y-%m-%d", time.gmtime((t0 - 32 * DAY_MS) / 1000))
    stack.psql(f"SELECT charges_ensure_partitions('{first_day}', '{last_day}')")
    old = []
    for d in range(32, 40):
        for i in range(25):
            ms = t0 - d * DAY_MS + 1000 * i
            old.append((_rid(ms), acct, "device.read", 2, 2, "commit", 200, ms))
    for r in old:
        _feed(stack, r[7] + 50, r[:7])
    fresh = _rid(t0 + 10)
    _feed(stack, t0 + 20, (fresh, acct, "device.read", 5, 5, "commit", 200))
    _settled(stack)
    spent = _spent(stack, acct)
    assert spent == 2 * len(old) + 5
    months = sorted({time.strftime("%Y-%m", time.gmtime(r[7] / 1000)) for r in old} | {month})
    before = {m: _statement(stack, acct, m) for m in months}

    # ARCHIVE_DIR not a writable directory: nothing detached, nothing dropped.
    bad_dir = os.path.join(stack.dir, "not-a-dir")
    open(bad_dir, "w").close()
    env = {"ARCHIVE_DIR": bad_dir, "CHARGE_RETENTION_DAYS": "30"}
    p = stack.run_billing("archive", "run", env=env, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert stack.scalar("SELECT count(*) FROM charge_partitions WHERE state <> 'attached'") == "0"
    # A pass that died after taking a day out of charges: the next one
    # exports it from where it was left.
    victim = "charges_p" + time.strftime("%Y%m%d", time.gmtime((t0 - 35 * DAY_MS) / 1000))
    assert stack.scalar(f"SELECT charges_detach_partition('{victim}')") == "t"
    assert stack.scalar(f"SELECT count(*) FROM {victim}") == "25"

    archive = os.path.join(stack.dir, "archive")
    os.makedirs(archive)
    env["ARCHIVE_DIR"] = archive
    p = stack.run_billing("archive", "run", env=env)
    assert "partitions archived 8" in p.stdout, p.stdout  # never charges_legacy
    listed = stack.run_billing("archive", "list", "--json", env=env).stdout
    parts = {x["name"]: x for x in json.loads(listed)["partitions"]}
    total = 0
    for d in range(32, 40):
        name = "charges_p" + time.strftime("%Y%m%d", time.gmtime((t0 - d * DAY_MS) / 1000))
        x = parts[name]
        assert x["state"] == "archived" and x["rows"] == 25, x
        with open(x["file"], "rb") as f:
            raw = f.read()
        assert hashlib.sha256(raw).hexdigest() == x["sha256"] and len(raw) == x["bytes"]
        rows = list(csv.DictReader(io.StringIO(gzip.decompress(raw).decode())))
        assert len(rows) == 25 and {r["reservation_id"] for r in rows} <= {o[0] for o in old}
        total += sum(int(r["amount"]) for r in rows)
        assert stack.scalar(f"SELECT to_regclass('{name}')") in (None, "")
    assert total == 2 * len(old)
    assert not [f for f in os.listdir(archive) if f.endswith(".tmp")]
    assert parts["charges_legacy"]["state"] == "attached"
    # the per-call rows are gone; the money is not
    assert stack.scalar(f"SELECT count(*) FROM charges WHERE account_id = {acct}") == "1"
    assert _spent(stack, acct) == spent
    for m in months:
        assert _statement(stack, acct, m) == before[m], m
    r = _finance(stack, f"/v1/charges/{old[0][0]}")
    assert r.status == 404 and r.json()["error"] == "archived" and r.json()["file"].startswith(
        archive), r
    # a redelivered record of a dropped day: dead letter, not charged, not lost
    dead = _dead(stack)
    _feed(stack, old[3][7] + 50, old[3][:7])
    stack.wait_for(lambda: _dead(stack) == dead + 1, what="the record dead-lettered")
    _settled(stack)
    assert _spent(stack, acct) == spent
    assert stack.scalar(f"SELECT charges_ensure_partitions('{first_day}', '{last_day}')") == "0"
    # a second pass finds nothing more to do
    assert "partitions archived 0" in stack.run_billing("archive", "run", env=env).stdout
    text = stack.run_billing("archive", "list", env=env).stdout
    assert "archived" in text and "attached" in text


def test_a_closed_month_never_changes(stack):
    """Once a month is closed, a charge settled later for one of its calls
    is booked on the day it is settled (original time kept): the closed
    month's statement stays as issued, and the open month's adds up with
    the charge in it. Late upgrades of a closed month's expired call book
    their points the same way. A month that has not ended cannot close."""
    stack.start_billing()
    acct = stack.new_account(points=1000)[0]
    now = int(time.time() * 1000)
    t = time.gmtime(now / 1000)
    prev = f"{t.tm_year - 1}-12" if t.tm_mon == 1 else f"{t.tm_year}-{t.tm_mon - 1:02d}"
    cur = f"{t.tm_year}-{t.tm_mon:02d}"
    prev_ms = calendar.timegm(time.strptime(prev + "-15", "%Y-%m-%d")) * 1000
    stack.psql(f"SELECT charges_ensure_partitions('{prev}-15', '{prev}-15')")
    swept = _rid(prev_ms)
    _feed(stack, prev_ms + 100, (_rid(prev_ms + 1), acct, "device.read", 7, 7, "commit", 200),
          (swept, acct, "device.read", 0, 4, "expire", 0))
    _settled(stack)
    # billing closes by itself the last month that ended STATEMENT_CLOSE_DAYS ago
    back = time.gmtime(now / 1000 - 300 * 86400)
    auto = (f"{back.tm_year - 1}-12" if back.tm_mon == 1
            else f"{back.tm_year}-{back.tm_mon - 1:02d}")
    p = stack.run_billing("archive", "run", env={"STATEMENT_CLOSE_DAYS": "300"})
    assert "months closed 1" in p.stdout, p.stdout
    assert [x["month"] for x in stack.admin("GET", "/v1/periods").json()["closed"]] == [auto]
    assert "months closed 0" in stack.run_billing(
        "archive", "run", env={"STATEMENT_CLOSE_DAYS": "300"}).stdout
    # the current month cannot close; the previous one can, once
    r = stack.admin("POST", f"/v1/periods/{cur}/close")
    assert r.status == 409 and r.json()["error"] == "month_open", r
    assert stack.admin("POST", "/v1/periods/2026-13/close").status == 400
    assert _statement(stack, acct, prev)["closed"] is None
    p = stack.run_billing("period", "close", prev)
    assert '"closed_now": true' in p.stdout
    assert '"closed_now": false' in stack.run_billing("period", "close", prev).stdout
    issued = _statement(stack, acct, prev)
    assert issued["closed"] and issued["charges"]["total"] == 7
    assert [x["month"] for x in stack.admin("GET", "/v1/periods").json()["closed"]] == [auto, prev]
    # late: a call of the closed month settled now, and the swept call's late settle
    late = _rid(prev_ms + 2)
    _feed(stack, prev_ms + 200, (late, acct, "device.read", 5, 5, "commit", 200))
    _feed(stack, now, (swept, acct, "device.read", 4, 4, "late", 200))
    _settled(stack)
    assert _spent(stack, acct) == 16
    assert _statement(stack, acct, prev) == issued
    s = _statement(stack, acct, cur)
    assert s["charges"]["total"] == 9 and s["closed"] is None
    assert s["opening"] + s["credits"]["total"] - s["charges"]["total"] == s["closing"]
    assert s["closing"] == 1000 - 16
    today = time.strftime("%Y-%m-%d", time.gmtime())
    j = _finance(stack, f"/v1/charges/{late}").json()
    assert j["booked_on"] == today and j["occurred_at"].startswith(prev), j
    assert _finance(stack, f"/v1/charges/{swept}").json()["booked_on"] == today
    # the closed month's failed call stays counted there; no negative count
    assert stack.scalar(f"SELECT min(failed_calls) FROM usage_daily WHERE account_id = {acct}"
                        ) == "0"


def test_migration_moves_a_million_rows(stack):
    """An existing unpartitioned charges table (schema up to 010) of a
    million rows over 30 days, plus rows whose ids are not the gateway's:
    `billing migrate` moves every row into its day's partition, exactly
    (count, points, a checksum of every row), and settlement goes on."""
    db = "mig_" + uuid.uuid4().hex[:8]
    stack.psql(f"CREATE DATABASE {db}")
    url = stack.env["DATABASE_URL"].rsplit("/", 1)[0] + "/" + db
    env = {"DATABASE_URL": url}
    stack.run_billing("migrate", "--to", "10", env=env)
    t0 = _today_ms() - 30 * DAY_MS
    fill = f"""
        INSERT INTO accounts (name, credited) SELECT 'm-' || g, 10000000000 FROM generate_series(1, 100) g;
        INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status, occurred_at)
        SELECT lpad(to_hex({t0} + g * 2592), 12, '0') || substr(md5(g::text), 1, 20),
               1 + g % 100, 'route.' || (g % 5), g % 7, 7,
               CASE WHEN g % 7 = 0 THEN 'release' ELSE 'commit' END, 200,
               to_timestamp(({t0} + g * 2592 + 40) / 1000.0)
        FROM generate_series(1::bigint, 1000000) g;
        INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status, occurred_at)
        SELECT 'old-' || g, 1, 'route.0', 1, 1, 'commit', 200, now() FROM generate_series(1, 100) g;
        -- ids of the gateways before time-ordered ids: 32 random hex digits
        INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status, occurred_at)
        SELECT replace(gen_random_uuid()::text, '-', ''), 2, 'route.1', 1, 1, 'commit', 200,
               now() - interval '20 days' FROM generate_series(1, 10000) g;
    """
    p = subprocess.run(["psql", url, "-q", "-v", "ON_ERROR_STOP=1", "-c", fill],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    digest = ("SELECT count(*), sum(amount), sum(hashtext(reservation_id || '|' || account_id"
              " || '|' || route || '|' || amount || '|' || outcome || '|' || occurred_at))"
              " FROM charges")

    def q(sql):
        p = subprocess.run(["psql", url, "-At", "-c", sql], check=True, capture_output=True,
                           text=True, timeout=300)
        return p.stdout.strip()
    before = q(digest)
    assert before.startswith("1010100|")
    started = time.time()
    p = stack.run_billing("migrate", env=env)
    took = time.time() - started
    assert "1 applied" in p.stdout, p.stdout + p.stderr
    print(f"migrated 1,010,100 charges in {took:.1f} s")
    assert q(digest) == before
    assert q("SELECT relkind FROM pg_class WHERE relname = 'charges'") == "p"
    # random ids decode to random instants: to charges_legacy, not to a day
    # decades away (nor thousands of partitions)
    assert int(q("SELECT count(*) FROM charges_legacy")) >= 10090
    assert int(q("SELECT count(*) FROM charge_partitions")) < 60
    # every row in its day's partition, and each day a partition
    assert q("SELECT count(*) FROM charges WHERE (tableoid::regclass::text = 'charges_p' ||"
             " to_char(reserved_at AT TIME ZONE 'UTC', 'YYYYMMDD'))") == "1000000"
    assert int(q("SELECT count(*) FROM charge_partitions WHERE state = 'attached'")) >= 30 + 14
    assert q("SELECT to_regclass('charges_unpartitioned')") == ""
