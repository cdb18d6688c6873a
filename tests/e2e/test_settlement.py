"""The outbox from Redis into Postgres (DESIGN.md, "Invariants"): the real
reserve.lua / settle.lua driven directly, and `billing serve`'s settlement
worker and sweeper checked against Postgres.

Proves: settle outcomes and idempotence, exactly one charge row per
reservation, accounts.spent and usage_daily moved in step, conservation after
bursts, crash safety under kill -9 and with two billing processes at once,
expired holds released at cost 0, Postgres outages that lose nothing, and no
overdraft under concurrent reservers; late (spilled) settles that upgrade an
expire row once and never overdraw; the backlog count (pg:backlog) equal to
the records pending through bursts and kill -9; and calls Postgres refuses as
data dead-lettered alone while the rest of their batch lands.
"""
import datetime
import random
import threading
import time
import uuid

from harness import FINANCE_TOKEN, http
from luahelp import (BACKLOG, OUTBOX, Redis, acct_key, entries, holds_key, outbox_add, records,
                     run_threads, script_source, swept_key)


# ---- helpers ---------------------------------------------------------------
def _billing(stack, env=None):
    if stack.billing is None or not stack.billing.alive():
        stack.start_billing(env)
    return stack.billing


def _stop_billing(stack):
    for p in stack.procs:
        if p.name == "billing" and p.alive():
            assert p.stop() == 0, p.output()[-3000:]


def _accounts(stack, n, points):
    _billing(stack)
    return [stack.new_account(points, name=f"settle-{i}")[0] for i in range(n)]


def _drain(stack, timeout=60.0):
    stack.wait_for(stack.drained, timeout=timeout, what="outbox drained")


def _uid():
    """A suffix unique to this attempt, for reservation ids: the runner
    retries a failed test once on the same stack, and a retry that met the
    first attempt's rows (reservation ids are unique in Postgres) could
    never pass and would hide the first failure."""
    return uuid.uuid4().hex[:12]


def _pg_spent(stack, acct):
    return int(stack.scalar(f"select spent from accounts where id = {acct}"))


def _charges(stack, acct):
    """count, sum(amount) of an account's charge rows."""
    row = stack.psql(f"select count(*), coalesce(sum(amount), 0) from charges "
                     f"where account_id = {acct}")[0]
    return int(row[0]), int(row[1])


def _usage_totals(stack, acct):
    row = stack.psql(f"select coalesce(sum(calls),0), coalesce(sum(points),0), "
                     f"coalesce(sum(failed_calls),0) from usage_daily where account_id = {acct}")[0]
    return tuple(int(x) for x in row)


def _expected_charge(price, outcome, charge):
    if outcome != "commit":
        return 0
    return max(0, min(charge, price))


def _plan(rng, accts, n, prefix):
    """N random calls: (acct, rid, price, outcome, requested charge, route)."""
    routes = ["device.read", "device.command", "device.batch"]
    out = []
    for i in range(n):
        a = accts[i % len(accts)]
        price = rng.randint(1, 9)
        outcome = rng.choice(["commit", "commit", "commit", "release", "expire"])
        charge = rng.randint(-1, price + 3)
        out.append((a, f"{prefix}-{i}", price, outcome, charge, rng.choice(routes)))
    return out


def _run_plan(stack, plan, chunk=500):
    """Reserves and settles every call of PLAN (pipelined); checks each reply
    and returns {acct: [calls, spent, failed]} as expected in Postgres."""
    red = Redis(stack.redis_port)
    exp = {}
    try:
        for i in range(0, len(plan), chunk):
            part = plan[i:i + chunk]
            cmds = []
            for a, rid, price, outcome, charge, route in part:
                cmds.append(red.reserve_cmd(a, rid, price, 600000, route))
                cmds.append(red.settle_cmd(a, rid, charge, outcome, 200 if outcome == "commit" else 502))
            replies = red.pipeline(cmds)
            for k, (a, rid, price, outcome, charge, route) in enumerate(part):
                res, st = replies[2 * k], replies[2 * k + 1]
                assert isinstance(res, list) and res[0] == 1, (rid, res)
                want = _expected_charge(price, outcome, charge)
                assert isinstance(st, list) and st[:2] == [1, want], (rid, price, outcome, charge, st)
                e = exp.setdefault(a, [0, 0, 0])
                e[0] += 1
                e[1] += want
                e[2] += outcome != "commit"
    finally:
        red.close()
    return exp


def _merge(a, b):
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        e = out.setdefault(k, [0, 0, 0])
        for i in range(3):
            e[i] += v[i]
    return out


def _assert_conserved(stack, exp, base=None):
    """Once drained: Redis spent == Postgres spent == sum(charges) == expected,
    held 0, and the rollup counts every call once."""
    base = base or {}
    for a, (calls, spent, failed) in exp.items():
        b = base.get(a, (0, 0, 0))
        hot = stack.hot(a)
        assert hot["held"] == 0, (a, hot)
        assert _charges(stack, a) == (calls + b[0], spent + b[1]), (a, _charges(stack, a), exp[a])
        assert _pg_spent(stack, a) == spent + b[1], a
        assert hot["spent"] == spent + b[1], (a, hot)
        assert _usage_totals(stack, a) == (calls + b[0], spent + b[1], failed + b[2]), a
        assert stack.redis_raw("HLEN", holds_key(a)) == "0"


def _snapshot(stack, accts):
    return {a: (_charges(stack, a)[0], _charges(stack, a)[1],
                _usage_totals(stack, a)[2]) for a in accts}


# ---- the scripts and one settlement ----------------------------------------
def test_reserve_settle_outcomes_and_settlement(stack):
    a, poor = _accounts(stack, 2, 0)
    assert stack.admin("POST", f"/v1/accounts/{a}/topups",
                       {"amount": 1000, "reference": "outcomes"}).status == 201
    # Billing stopped: the outbox is inspected before anything consumes it.
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(999999999, "nobody", 1) == [-1, 0, 0]
        assert red.call("EXISTS", holds_key(999999999)) == 0
        assert red.reserve(poor, "poor-1", 1) == [0, 0, 0]
        assert red.acct(poor) == {"credited": 0, "seq": 0, "spent": 0, "held": 0}
        assert red.reserve(a, "r-commit", 10, 60000, "device.command") == [1, 990, 10]
        # Same rid again: idempotent, nothing held twice.
        assert red.reserve(a, "r-commit", 10, 60000, "device.command") == [1, 990, 10]
        assert red.reserve(a, "r-partial", 100, 60000, "device.batch") == [1, 890, 110]
        assert red.reserve(a, "r-cap", 100, 60000, "device.batch") == [1, 790, 210]
        assert red.reserve(a, "r-release", 5, 60000, "device.command") == [1, 785, 215]
        assert red.reserve(a, "r-expire", 1, 60000, "device.read") == [1, 784, 216]
        assert red.reserve(a, "r-neg", 7, 60000, "device.read") == [1, 777, 223]
        # Short: nothing changes.
        assert red.reserve(a, "r-big", 778, 60000, "device.read") == [0, 777, 223]
        assert red.call("HLEN", holds_key(a)) == 6
        amount, route, deadline = red.call("HGET", holds_key(a), "r-cap").split("|")
        assert (amount, route) == ("100", "device.batch")
        assert abs(int(deadline) - 60000 - time.time() * 1000) < 120000, deadline
        assert red.acct(a) == {"credited": 1000, "seq": 1, "spent": 0, "held": 223}
        assert red.call("XLEN", OUTBOX) == 0  # reserving charges nothing

        assert red.settle(a, "r-commit", 10, "commit", 200) == [1, 10, 777]
        assert red.settle(a, "r-partial", 30, "commit", 200) == [1, 30, 847]  # rest released
        assert red.settle(a, "r-cap", 150, "commit", 201) == [1, 100, 847]   # capped at hold
        assert red.settle(a, "r-release", 5, "release", 503) == [1, 0, 852]
        assert red.settle(a, "r-expire", 1, "expire", 0) == [1, 0, 853]
        assert red.settle(a, "r-neg", -3, "commit", 200) == [1, 0, 860]      # floor 0
        final = {"credited": 1000, "seq": 1, "spent": 140, "held": 0}
        assert red.acct(a) == final
        assert red.call("HLEN", holds_key(a)) == 0
        assert red.call("XLEN", OUTBOX) == 6
        # Settling twice, or a hold that never existed: a no-op.
        assert red.settle(a, "r-commit", 10, "commit", 200) == [0, 0, 860]
        assert red.settle(a, "r-release", 0, "commit", 200) == [0, 0, 860]
        assert red.settle(a, "never-reserved", 5, "commit", 200) == [0, 0, 860]
        assert red.acct(a) == final
        assert red.call("XLEN", OUTBOX) == 6
    finally:
        red.close()

    want = {
        "r-commit": ("device.command", 10, 10, "commit", 200),
        "r-partial": ("device.batch", 30, 100, "commit", 200),
        "r-cap": ("device.batch", 100, 100, "commit", 201),
        "r-release": ("device.command", 0, 5, "release", 503),
        "r-expire": ("device.read", 0, 1, "expire", 0),
        "r-neg": ("device.read", 0, 7, "commit", 200),
    }
    ts = {}
    for f in records(stack):
        rid = f["rid"]
        route, amount, hold, outcome, status = want[rid]
        assert f["acct"] == str(a) and f["route"] == route, f
        assert (int(f["amount"]), int(f["hold"]), f["outcome"], int(f["status"])) == \
            (amount, hold, outcome, status), f
        assert abs(int(f["ts"]) - time.time() * 1000) < 120000, f
        ts[rid] = int(f["ts"])
    assert sorted(ts) == sorted(want)

    _billing(stack)
    _drain(stack)
    rows = stack.psql(
        "select reservation_id, account_id, route, amount, hold, outcome, status, "
        "round(extract(epoch from occurred_at) * 1000)::bigint from charges "
        f"where account_id = {a} order by reservation_id")
    assert len(rows) == 6, rows
    for rid, acct, route, amount, hold, outcome, status, occurred in rows:
        assert (route, int(amount), int(hold), outcome, int(status)) == want[rid], rid
        assert int(acct) == a
        assert abs(int(occurred) - ts[rid]) <= 1, (rid, occurred, ts[rid])
    assert _pg_spent(stack, a) == 140 == stack.hot(a)["spent"]
    # usage_daily by UTC day and route.
    day = datetime.datetime.fromtimestamp(ts["r-commit"] / 1000, datetime.timezone.utc).date()
    usage = stack.psql(f"select day, route, calls, points, failed_calls from usage_daily "
                       f"where account_id = {a} order by route")
    assert usage == [
        [str(day), "device.batch", "2", "130", "0"],
        [str(day), "device.command", "2", "10", "1"],
        [str(day), "device.read", "2", "0", "1"],
    ], usage
    j = stack.admin("GET", f"/v1/accounts/{a}").json()
    assert (j["credited"], j["spent"], j["balance"], j["available"], j["held"]) == \
        (1000, 140, 860, 860, 0), j
    assert stack.scalar(f"select count(*) from charges where account_id = {poor}") == "0"


def test_batched_scripts_apply_in_order_and_write_one_entry(stack):
    """The gateway sends every reserve (settle) of a loop pass as one script
    call: ops see the ones before them, accounts mix, one outbox entry."""
    a, b = _accounts(stack, 2, 10)
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    try:
        red.call("DEL", OUTBOX)
        got = red.call(*red.reserve_batch_cmd([
            (a, "b-1", 4, 60000, "device.read"),
            (b, "b-2", 10, 60000, "device.read"),
            (a, "b-3", 6, 60000, "device.read"),   # exactly what is left of a
            (a, "b-4", 1, 60000, "device.read"),   # short now
            (a, "b-1", 4, 60000, "device.read"),   # the same rid: already held
            (999999999, "b-5", 1, 60000, "device.read"),
        ]))
        assert got == [1, 6, 4, 1, 0, 10, 1, 0, 10, 0, 0, 10, 1, 0, 10, -1, 0, 0], got
        assert red.acct(a)["held"] == 10 and red.acct(b)["held"] == 10
        # A bad price anywhere refuses the whole batch before any write.
        bad = red.pipeline([red.reserve_batch_cmd([(a, "b-6", 1, 60000, "r"),
                                                   (b, "b-7", 0, 60000, "r")])])[0]
        assert "positive integer" in str(bad)
        assert red.call("HEXISTS", holds_key(a), "b-6") == 0
        # Figures the scripts would not hold exactly or write canonically:
        # refused before any write, whichever op carries them.
        for price, ttl in [("1e3", 60000), ("05", 60000), ("2.0", 60000), (2**53 + 2, 60000),
                           (1, "1.5"), (1, "6e4"), (1, -1)]:
            bad = red.pipeline([red.reserve_batch_cmd([(a, "b-6", 1, 60000, "r"),
                                                       (b, "b-7", price, ttl, "r")])])[0]
            assert "positive integer" in str(bad), (price, ttl, bad)
        assert red.call("HEXISTS", holds_key(a), "b-6") == 0
        for charge in ["1e0", "-0", "01", 2**53 + 2]:
            bad = red.pipeline([red.settle_batch_cmd([(a, "b-1", charge, "commit", 200)])])[0]
            assert "must be an integer" in str(bad), (charge, bad)
        assert red.acct(a)["held"] == 10 and red.call("XLEN", OUTBOX) == 0
        got = red.call(*red.settle_batch_cmd([
            (a, "b-1", 4, "commit", 200),
            (b, "b-2", 0, "release", 503),
            (a, "b-1", 4, "commit", 200),          # settled just before: a no-op
            (a, "b-3", 2, "commit", 200),          # usage: 2 of the 6 held
            (a, "never", 1, "commit", 200),
        ]))
        assert got == [1, 4, 0, 1, 0, 10, 0, 0, 0, 1, 2, 4, 0, 0, 4], got
        assert red.acct(a) == {"credited": 10, "seq": 1, "spent": 6, "held": 0}
        assert red.acct(b) == {"credited": 10, "seq": 1, "spent": 0, "held": 0}
        assert red.call("XLEN", OUTBOX) == 1
        assert [(r["rid"], r["acct"], r["amount"], r["hold"], r["outcome"], r["status"])
                for r in records(stack)] == [
            ("b-1", str(a), "4", "4", "commit", "200"),
            ("b-2", str(b), "0", "10", "release", "503"),
            ("b-3", str(a), "2", "6", "commit", "200")]
        # Only no-ops: no entry at all.
        assert red.call(*red.settle_batch_cmd([(a, "b-1", 4, "commit", 200)])) == [0, 0, 4]
        assert red.call("XLEN", OUTBOX) == 1
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    assert _charges(stack, a) == (2, 6) and _charges(stack, b) == (1, 0)
    assert _pg_spent(stack, a) == 6 == stack.hot(a)["spent"]


def test_a_broken_account_fails_alone_and_changes_nothing(stack):
    """A Lua error keeps the writes made before it: one account whose data in
    Redis is unusable must fail its own ops only, and a refused outbox entry
    must leave every hold as it was."""
    a, b = _accounts(stack, 2, 100)
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    try:
        red.call("DEL", OUTBOX)
        red.call("SET", holds_key(b), "not a hash")  # WRONGTYPE for b's holds
        got = red.call(*red.reserve_batch_cmd([(a, "x-1", 5, 60000, "r"),
                                               (b, "x-2", 5, 60000, "r"),
                                               (a, "x-3", 5, 60000, "r")]))
        assert got == [1, 95, 5, -2, 0, 0, 1, 90, 10], got
        assert red.acct(a)["held"] == 10 and red.acct(b)["held"] == 0
        got = red.call(*red.settle_batch_cmd([(a, "x-1", 5, "commit", 200),
                                              (b, "x-2", 5, "commit", 200)]))
        assert got == [1, 5, 90, -2, 0, 100], got
        assert red.acct(a) == {"credited": 100, "seq": 1, "spent": 5, "held": 5}
        assert [r["rid"] for r in records(stack)] == ["x-1"]
        # A hold value without its parts: that op alone is refused.
        red.call("HSET", holds_key(a), "x-bad", "garbage")
        got = red.call(*red.settle_batch_cmd([(a, "x-bad", 1, "commit", 200),
                                              (a, "x-3", 5, "commit", 200)]))
        assert got == [-2, 0, 90, 1, 5, 90], got
        assert red.call("HGET", holds_key(a), "x-bad") == "garbage"
        red.call("HDEL", holds_key(a), "x-bad")
        # Figures HINCRBY would refuse after earlier writes (non-numeric, or
        # numbers Lua reads but Redis does not): the account's ops are
        # refused, nothing held, the others' go through.
        red.call("DEL", holds_key(b))
        for bad in ["lots", "5.0", "05", "1e1", " 5"]:
            red.call("HSET", acct_key(b), "held", bad)
            got = red.call(*red.reserve_batch_cmd([(a, f"x-ok-{bad}", 1, 60000, "r"),
                                                   (b, "x-4", 1, 60000, "r")]))
            assert got[3:] == [-2, 0, 0] and got[0] == 1, (bad, got)
            assert red.call("EXISTS", holds_key(b)) == 0
            assert red.settle(a, f"x-ok-{bad}", 0, "release", 503)[0] == 1
        red.call("HSET", acct_key(b), "held", "0")
        # The outbox refuses the entry (wrong type): an error, and no hold
        # closed, no figure moved.
        assert red.reserve(a, "x-5", 7)[0] == 1
        before = red.acct(a)
        red.call("RENAME", OUTBOX, "pg:outbox:aside")
        red.call("SET", OUTBOX, "not a stream")
        bad = red.pipeline([red.settle_cmd(a, "x-5", 7)])[0]
        assert str(bad).startswith("WRONGTYPE"), bad  # Redis's own error, nothing written
        assert red.acct(a) == before and red.call("HEXISTS", holds_key(a), "x-5") == 1
        red.call("DEL", OUTBOX)
        red.call("RENAME", "pg:outbox:aside", OUTBOX)
        assert red.settle(a, "x-5", 7) == [1, 7, 83]
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    assert _charges(stack, a) == (8, 17) and _charges(stack, b) == (0, 0)  # 5 releases at 0
    assert _pg_spent(stack, a) == 17 == stack.hot(a)["spent"]


def test_large_figures_stay_exact(stack):
    """Lua numbers are doubles: every figure the scripts write must stay an
    exact integer up to the ledger's ceilings (10^12 per entry)."""
    (a,) = _accounts(stack, 1, 0)
    for i in range(4):
        assert stack.admin("POST", f"/v1/accounts/{a}/topups",
                           {"amount": 10**12, "reference": f"big-{i}"}).status == 201
    stack.wait_for(lambda: stack.hot(a).get("credited") == 4 * 10**12, what="credits pushed")
    _stop_billing(stack)
    price = 10**12 - 7
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "big-1", price, 60000, "device.batch") == \
            [1, 4 * 10**12 - price, price]
        assert red.call("HGET", holds_key(a), "big-1").startswith(f"{price}|device.batch|")
        assert red.settle(a, "big-1", price - 1, "commit", 200) == [1, price - 1,
                                                                     4 * 10**12 - price + 1]
        (rec,) = [r for r in records(stack) if r["rid"] == "big-1"]
        assert (rec["amount"], rec["hold"]) == (str(price - 1), str(price)), rec
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    assert _charges(stack, a) == (1, price - 1)
    assert _pg_spent(stack, a) == price - 1 == stack.hot(a)["spent"]


def test_entry_larger_than_a_transaction_is_settled_whole(stack):
    """An entry carries up to a gateway batch of calls; the worker's batch
    may be smaller (SETTLE_BATCH=3): every call is still applied once."""
    (a,) = _accounts(stack, 1, 1000)
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    try:
        ops = [(a, f"big-entry-{i}", 2, 60000, "device.read") for i in range(50)]
        assert red.call(*red.reserve_batch_cmd(ops))[0::3] == [1] * 50
        red.call(*red.settle_batch_cmd([(a, f"big-entry-{i}", 2, "commit", 200)
                                        for i in range(50)]))
        red.call(*red.settle_batch_cmd([(a, f"big-entry-x{i}", 2, "commit", 200)
                                        for i in range(3)]))  # no-ops
        assert red.call("XLEN", OUTBOX) == 1
    finally:
        red.close()
    _billing(stack, {"SETTLE_BATCH": "3"})
    _drain(stack)
    assert _charges(stack, a) == (50, 100)
    assert _pg_spent(stack, a) == 100 == stack.hot(a)["spent"]
    _stop_billing(stack)
    _billing(stack)


def test_redelivered_entry_changes_nothing(stack):
    _billing(stack)
    (a,) = _accounts(stack, 1, 100)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "dup-1", 9, 60000, "device.command")[0] == 1
        assert red.settle(a, "dup-1", 9)[:2] == [1, 9]
        _drain(stack)
        assert _charges(stack, a) == (1, 9)
        before = (stack.psql("select * from usage_daily order by 1, 2, 3"),
                  _pg_spent(stack, a))
        # The same entry delivered again (a crash between commit and ack), twice.
        ts = int(time.time() * 1000)
        for _ in range(2):
            outbox_add(red, ts, ("dup-1", a, "device.command", 9, 9, "commit", 200))
    finally:
        red.close()
    _drain(stack)
    assert _charges(stack, a) == (1, 9)
    assert (stack.psql("select * from usage_daily order by 1, 2, 3"), _pg_spent(stack, a)) == before


def test_poison_entries_do_not_stall_settlement(stack):
    (a,) = _accounts(stack, 1, 100)
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    ts = int(time.time() * 1000)
    try:
        red.call("DEL", "pg:outbox:dead")
        assert red.reserve(a, "good-1", 3)[0] == 1
        assert red.settle(a, "good-1", 3)[:2] == [1, 3]
        # An entry for an account Postgres does not know (integrity refusal).
        outbox_add(red, ts, ("ghost-1", 999999999, "device.read", 4, 4, "commit", 200))
        # Malformed entries: missing fields, negative amount.
        red.call("XADD", OUTBOX, "*", "rid", "broken-1", "acct", a)  # an old or foreign format
        outbox_add(red, ts, ("neg-1", a, "device.read", -4, 4, "commit", 200))
        assert red.reserve(a, "good-2", 5)[0] == 1
        assert red.settle(a, "good-2", 5)[:2] == [1, 5]
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    assert _charges(stack, a) == (2, 8)
    assert _pg_spent(stack, a) == 8 == stack.hot(a)["spent"]
    # every poison entry is kept for a human, in the order met, with the reason
    dead = entries(stack, "pg:outbox:dead")
    assert [f["why"] for _, f in dead] == ["malformed", "malformed", "integrity"], dead
    assert dead[2][1]["rid"] == "ghost-1"
    # a malformed entry is copied whole: its own fields come with it
    assert (dead[0][1]["rid"], dead[0][1]["acct"]) == ("broken-1", str(a)), dead[0]
    assert all(f["entry"] for _, f in dead[:2])  # the stream ids of the malformed ones
    assert stack.scalar("select count(*) from charges where reservation_id in "
                        "('ghost-1', 'broken-1', 'neg-1')") == "0"


# ---- conservation ----------------------------------------------------------
def test_conservation_after_burst(stack):
    _billing(stack)
    accts = _accounts(stack, 4, 10**9)
    base = _snapshot(stack, accts)
    rng = random.Random(1234)
    plans = [_plan(rng, [a], 1500, f"burst{a}") for a in accts]
    # One thread per account, all while the settlement worker runs.
    results = run_threads(len(plans), lambda i: _run_plan(stack, plans[i], chunk=250))
    exp = {}
    for r in results:
        exp = _merge(exp, r)
    assert sum(v[0] for v in exp.values()) == 6000
    _drain(stack)
    _assert_conserved(stack, exp, base)
    for a in accts:
        j = stack.admin("GET", f"/v1/accounts/{a}").json()
        assert j["spent"] == _pg_spent(stack, a) and j["available"] == j["balance"], j


# ---- crash safety ----------------------------------------------------------
def test_kill9_while_settling_loses_and_doubles_nothing(stack):
    accts = _accounts(stack, 2, 10**9)
    base = _snapshot(stack, accts)
    _stop_billing(stack)
    total = 20000
    exp = _run_plan(stack, _plan(random.Random(99), accts, total, "crash"), chunk=1000)
    assert int(stack.redis_raw("XLEN", OUTBOX)) == total

    def settled():
        return int(stack.scalar("select count(*) from charges where reservation_id like 'crash-%'"))

    mid_kills = 0
    for round_ in range(4):
        before = settled()
        if before >= total:
            break
        p = _billing(stack, {"SETTLE_BATCH": "100"})
        # Kill once it has made progress, at a varying moment.
        stack.wait_for(lambda: settled() > before, timeout=30, what="settlement progress")
        time.sleep(random.Random(round_).uniform(0.0, 0.15))
        p.kill9()
        at_kill = settled()
        if at_kill < total:
            mid_kills += 1
    assert mid_kills >= 1, "billing finished before it could be killed; the test proved nothing"
    _billing(stack)
    _drain(stack, timeout=120)
    assert settled() == total
    _assert_conserved(stack, exp, base)


def test_two_billing_processes_settle_exactly_once(stack):
    accts = _accounts(stack, 3, 10**9)
    base = _snapshot(stack, accts)
    _stop_billing(stack)
    rng = random.Random(7)
    exp = _run_plan(stack, _plan(rng, accts, 6000, "two-a"), chunk=1000)
    env = {"SETTLE_WORKERS": "2", "SETTLE_BATCH": "200"}
    first = stack.start_billing(env)
    second = stack.start_billing(env)
    # More traffic while both settle.
    more = run_threads(3, lambda i: _run_plan(stack, _plan(random.Random(i), [accts[i]], 1000,
                                                           f"two-b{i}"), chunk=100))
    for r in more:
        exp = _merge(exp, r)
    _drain(stack, timeout=120)
    assert first.alive() and second.alive()
    _assert_conserved(stack, exp, base)
    assert int(stack.scalar("select count(*) from charges where reservation_id like 'two-%'")) == 9000
    assert second.stop() == 0
    stack.billing = first
    stack.admin_url = first.url


# ---- sweeper ---------------------------------------------------------------
def test_sweeper_releases_expired_holds(stack):
    _billing(stack)
    (a,) = _accounts(stack, 1, 10)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "sweep-short", 4, 100, "device.command") == [1, 6, 4]
        assert red.reserve(a, "sweep-long", 3, 600000, "device.read") == [1, 3, 7]
        stack.wait_for(lambda: red.call("HKEYS", holds_key(a)) == ["sweep-long"], timeout=10,
                       what="expired hold released")
        assert red.acct(a) == {"credited": 10, "seq": 1, "spent": 0, "held": 3}
        _drain(stack)
        row = stack.psql("select account_id, route, amount, hold, outcome, status from charges "
                         "where reservation_id = 'sweep-short'")
        assert row == [[str(a), "device.command", "0", "4", "expire", "0"]], row
        assert "released expired hold sweep-short" in stack.billing.output()
        # A late settle from the gateway that took it changes nothing.
        assert red.settle(a, "sweep-short", 4, "commit", 200) == [0, 0, 7]
        assert red.acct(a)["spent"] == 0
        # The live hold was not touched; settle it normally.
        time.sleep(0.5)
        assert red.call("HEXISTS", holds_key(a), "sweep-long") == 1
        assert red.settle(a, "sweep-long", 3, "commit", 200) == [1, 3, 7]
    finally:
        red.close()
    _drain(stack)
    assert _charges(stack, a) == (2, 3)
    assert _pg_spent(stack, a) == 3
    assert stack.hot(a) == {"credited": 10, "seq": 1, "spent": 3, "held": 0}
    failed = stack.scalar(f"select sum(failed_calls) from usage_daily where account_id = {a}")
    assert failed == "1"


# ---- no overdraft ----------------------------------------------------------
def test_sweeper_waits_after_a_redis_outage(stack):
    """Holds whose deadline passed while Redis was down mostly belong to calls
    whose gateways are about to resend their settles: the sweeper expires
    nothing for SWEEP_RECOVERY_MS after Redis answers again, then does."""
    _stop_billing(stack)
    _billing(stack, {"SWEEP_RECOVERY_MS": "5000"})
    (a,) = _accounts(stack, 1, 10)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "outage-1", 2, 500, "device.read")[0] == 1
    finally:
        red.close()
    stack.service("redis-stop")
    time.sleep(1.5)  # past the hold's deadline; the sweeper's passes fail
    stack.service("redis-start")
    back = time.time()
    red = Redis(stack.redis_port)
    try:
        # Without the quiet period it would go within one sweep (200 ms).
        time.sleep(1.0)
        assert red.call("HEXISTS", holds_key(a), "outage-1") == 1, time.time() - back
        stack.wait_for(lambda: red.call("HEXISTS", holds_key(a), "outage-1") == 0, timeout=10,
                       what="hold swept after the quiet period")
    finally:
        red.close()
    _drain(stack)
    assert stack.hot(a) == {"credited": 10, "seq": 1, "spent": 0, "held": 0}
    _stop_billing(stack)
    _billing(stack)


def test_no_overdraft_under_concurrent_reservers(stack):
    _billing(stack)
    (a,) = _accounts(stack, 1, 20)
    low = []
    stop = threading.Event()

    def monitor():
        m = Redis(stack.redis_port)
        try:
            while not stop.is_set():
                h = m.acct(a)
                if h["credited"] - h["spent"] - h["held"] < 0:
                    low.append(h)
        finally:
            m.close()

    def reserver(i):
        r = Redis(stack.redis_port)
        try:
            return [r.reserve(a, f"od-{rnd}-{i}-{k}", 1, 600000, "device.read")
                    for k in range(4)]
        finally:
            r.close()

    mon = threading.Thread(target=monitor)
    mon.start()
    try:
        for rnd, want in [(1, 20), (2, 10)]:
            results = run_threads(50, reserver)
            replies = [x for r in results for x in r]
            held = [x for x in replies if x[0] == 1]
            assert len(held) == want, (rnd, len(held))
            assert all(x[0] in (0, 1) for x in replies)
            assert all(x[1] >= 0 for x in replies), replies
            assert [x for x in replies if x[0] == 0 and x[1] != 0] == []
            h = stack.hot(a)
            assert h["held"] == want and h["credited"] - h["spent"] - h["held"] == 0, h
            # Settle: half committed, half released.
            red = Redis(stack.redis_port)
            try:
                rids = red.call("HKEYS", holds_key(a))
                assert len(rids) == want
                for k, rid in enumerate(sorted(rids)):
                    outcome = "commit" if k % 2 == 0 else "release"
                    assert red.settle(a, rid, 1, outcome)[:2] == [1, int(outcome == "commit")]
            finally:
                red.close()
    finally:
        stop.set()
        mon.join()
    assert low == [], low[:5]
    _drain(stack)
    assert _charges(stack, a) == (30, 15)
    assert stack.hot(a) == {"credited": 20, "seq": 1, "spent": 15, "held": 0}
    assert _pg_spent(stack, a) == 15


# ---- more recovery paths ---------------------------------------------------
def test_guard_hold_of_dead_billing_is_dropped_by_the_repair_pass(stack):
    """A negative adjustment's guard hold ('_' route) left by a billing that
    died is never expired by the sweeper (the adjustment's new total may not
    be in Redis yet: calls could spend the removed points); the repair pass
    drops it past its deadline together with Postgres' credited total, and
    it never becomes a charge row."""
    _billing(stack)
    (a,) = _accounts(stack, 1, 10)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "adj-deadbeef", 6, 100, "_adjustment") == [1, 4, 6]
        stack.wait_for(lambda: red.call("HLEN", holds_key(a)) == 0, timeout=10,
                       what="guard hold dropped")
    finally:
        red.close()
    assert "released expired hold adj-deadbeef" not in stack.billing.output()
    _drain(stack)
    assert stack.scalar("select count(*) from charges where reservation_id = 'adj-deadbeef'") == "0"
    assert stack.hot(a) == {"credited": 10, "seq": 1, "spent": 0, "held": 0}
    assert _usage_totals(stack, a) == (0, 0, 0)


def test_entries_of_a_vanished_consumer_are_claimed(stack):
    """Entries delivered to a consumer that never comes back (another host)
    are claimed after SETTLE_CLAIM_IDLE_MS and settled once."""
    (a,) = _accounts(stack, 1, 1000)
    _stop_billing(stack)
    exp = _run_plan(stack, _plan(random.Random(3), [a], 50, "orphan"), chunk=50)
    red = Redis(stack.redis_port)
    try:
        r = red.pipeline([("XGROUP", "CREATE", OUTBOX, "settle", "0", "MKSTREAM")])[0]
        assert r == "OK" or "BUSYGROUP" in str(r), r
        got = red.call("XREADGROUP", "GROUP", "settle", "otherhost-0", "COUNT", 1000,
                       "STREAMS", OUTBOX, ">")
        assert len(got[0][1]) == 50
        assert red.call("XPENDING", OUTBOX, "settle")[0] == 50
    finally:
        red.close()
    base = _charges(stack, a)
    _billing(stack)
    _drain(stack, timeout=30)
    assert _charges(stack, a) == (base[0] + 50, base[1] + exp[a][1])
    assert "claimed" in stack.billing.output()
    assert _pg_spent(stack, a) == stack.hot(a)["spent"]


def test_redis_loss_is_rebuilt_from_postgres(stack):
    """Redis loses everything: `billing repair` rebuilds balances from Postgres,
    the settlement worker recreates its group, and new calls settle again."""
    _billing(stack)
    (a,) = _accounts(stack, 1, 500)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "before-flush", 20)[0] == 1
        assert red.settle(a, "before-flush", 20)[:2] == [1, 20]
    finally:
        red.close()
    _drain(stack)
    stack.redis("FLUSHALL")
    stack.run_billing("repair")
    assert stack.hot(a) == {"credited": 500, "seq": 1, "spent": 20, "held": 0}
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, "after-flush", 30) == [1, 450, 30]
        assert red.settle(a, "after-flush", 30)[:2] == [1, 30]
    finally:
        red.close()
    stack.wait_for(lambda: _charges(stack, a) == (2, 50), timeout=20, what="settled after flush")
    _drain(stack)
    assert _pg_spent(stack, a) == 50 == stack.hot(a)["spent"]


# ---- Postgres outage -------------------------------------------------------
def test_postgres_down_loses_nothing(stack):
    _billing(stack)
    accts = _accounts(stack, 2, 10**9)
    base = _snapshot(stack, accts)
    _drain(stack)
    stack.service("pg-stop")
    try:
        exp = _run_plan(stack, _plan(random.Random(5), accts, 1000, "pgdown"), chunk=250)
        time.sleep(1.5)
        # Kept in the stream while Postgres is away, not dropped.
        assert int(stack.redis_raw("XLEN", OUTBOX)) == 1000
        assert stack.billing.alive()
        r = stack.admin("GET", f"/v1/accounts/{accts[0]}")
        assert r.status == 503 and r.json()["error"] == "database_unavailable", r
    finally:
        stack.service("pg-start")
    _drain(stack, timeout=60)
    _assert_conserved(stack, exp, base)
    assert int(stack.scalar("select count(*) from charges where reservation_id like 'pgdown-%'")) == 1000
    # The admin API answers again (test_api_answers_every_call_after_postgres_restart
    # holds it to answering every call; here it only has to come back).
    stack.wait_for(lambda: stack.admin("GET", f"/v1/accounts/{accts[0]}").status == 200,
                   timeout=10, what="admin API back")
    for _ in range(24):
        stack.admin("GET", f"/v1/accounts/{accts[0]}")
    assert stack.billing.alive()




def test_api_answers_every_call_after_postgres_restart(stack):
    """Once Postgres is back, every admin call succeeds: no call may fail on a
    connection that died with the old server."""
    _billing(stack)
    (a,) = _accounts(stack, 1, 5)
    # Every API thread has its Postgres connection open.
    for _ in range(24):
        assert stack.admin("GET", f"/v1/accounts/{a}").status == 200
    stack.service("pg-stop")
    stack.service("pg-start")
    time.sleep(0.5)
    statuses = [stack.admin("GET", f"/v1/accounts/{a}").status for _ in range(24)]
    assert statuses == [200] * 24, statuses


# ---- late (spilled) settles ------------------------------------------------
def _pg_consistent(stack, a):
    """Postgres agrees with itself for account A: spent is the sum of its
    charge rows, and the rollup counts each row once on its own day and
    route (a late row is a billed call, not a failed one)."""
    assert _pg_spent(stack, a) == _charges(stack, a)[1], a
    rows = stack.psql(
        "select day, route, calls, points, failed_calls from usage_daily "
        f"where account_id = {a} and calls <> 0 order by 1, 2")
    want = stack.psql(
        "select (occurred_at at time zone 'UTC')::date, route, count(*), sum(amount), "
        "count(*) filter (where outcome not in ('commit', 'late')) from charges "
        f"where account_id = {a} group by 1, 2 order by 1, 2")
    assert rows == want, (rows, want)


def _statement(stack, a):
    month = time.strftime("%Y-%m", time.gmtime())
    r = http("GET", f"{stack.admin_url}/v1/reports/statement?account={a}&month={month}",
             headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})
    assert r.status == 200, r
    return r.json()


def _swept(stack, red, a, rid):
    stack.wait_for(lambda: red.call("HEXISTS", holds_key(a), rid) == 0, timeout=15,
                   what=f"hold {rid} swept")


def test_late_settle_upgrades_the_expire_row_once(stack):
    """A settle the gateway answered but could only spill (Redis away at its
    stop), replayed after the sweeper released the hold: the charge is taken
    from the available points, the (expire, 0) row becomes (late, amount),
    accounts.spent and usage_daily move by the difference, once, however
    often the replay or its outbox entry comes again; reports and the
    statement add up."""
    _billing(stack)
    (a,) = _accounts(stack, 1, 100)
    rid = f"late-1-{_uid()}"
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, rid, 6, 100, "device.command") == [1, 94, 6]
        _swept(stack, red, a, rid)
        assert red.call("GET", swept_key(a, rid)) == "6|device.command"
        assert 6 * 86400 < red.call("TTL", swept_key(a, rid)) <= 7 * 86400
        _drain(stack)
        rows = stack.psql(f"select amount, hold, outcome from charges where reservation_id = "
                          f"'{rid}'")
        assert rows == [["0", "6", "expire"]], rows
        assert _usage_totals(stack, a) == (1, 0, 1)
        # Settlement stopped while the outbox is read: a running worker
        # takes and deletes the replay's entry within milliseconds.
        _stop_billing(stack)
        # The replay: charge 5 of the 6 held. Then twice more: no-ops.
        assert red.settle(a, rid, 5, "late", 200) == [1, 5, 95]
        assert red.call("EXISTS", swept_key(a, rid)) == 0
        for _ in range(2):
            assert red.settle(a, rid, 5, "late", 200) == [0, 0, 95]
        assert red.acct(a)["spent"] == 5
        (rec,) = [r for r in records(stack) if r["rid"] == rid]
        assert (rec["route"], rec["amount"], rec["hold"], rec["outcome"]) == \
            ("device.command", "5", "6", "late"), rec
        _billing(stack)
        _drain(stack)
        rows = stack.psql(f"select amount, hold, outcome, status from charges where "
                          f"reservation_id = '{rid}'")
        assert rows == [["5", "6", "late", "200"]], rows
        assert _pg_spent(stack, a) == 5 == stack.hot(a)["spent"]
        assert _usage_totals(stack, a) == (1, 5, 0)
        _pg_consistent(stack, a)
        # Its outbox entry delivered again, twice (a crash before the ack).
        before = (stack.psql("select * from usage_daily order by 1, 2, 3"), _pg_spent(stack, a))
        for _ in range(2):
            outbox_add(red, int(time.time() * 1000),
                       (rid, a, "device.command", 5, 6, "late", 200))
        _drain(stack)
        assert (stack.psql("select * from usage_daily order by 1, 2, 3"),
                _pg_spent(stack, a)) == before
        assert _charges(stack, a) == (1, 5)
        st = _statement(stack, a)
        assert st["charges"]["total"] == 5 and st["closing"] == 95, st
        assert st["opening"] + st["credits"]["total"] - st["charges"]["total"] == st["closing"]
        assert [(x["route"], x["calls"], x["points"], x["failed_calls"])
                for x in st["charges"]["by_route"]] == [("device.command", 1, 5, 0)], st
        j = stack.admin("GET", f"/v1/accounts/{a}").json()
        assert (j["spent"], j["balance"]) == (5, 95), j
    finally:
        red.close()


def test_late_settle_with_the_hold_there_is_a_commit(stack):
    _billing(stack)
    (a,) = _accounts(stack, 1, 50)
    rid = f"late-2-{_uid()}"
    _stop_billing(stack)  # the outbox is read before anything consumes it
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, rid, 4, 600000, "device.read")[0] == 1
        assert red.settle(a, rid, 9, "late", 200) == [1, 4, 46]  # capped at the hold
        assert red.settle(a, rid, 9, "late", 200) == [0, 0, 46]
        assert [(r["amount"], r["outcome"]) for r in records(stack) if r["rid"] == rid] == \
            [("4", "commit")]
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    rows = stack.psql(f"select amount, hold, outcome from charges where reservation_id = "
                      f"'{rid}'")
    assert rows == [["4", "4", "commit"]], rows
    assert _pg_spent(stack, a) == 4 == stack.hot(a)["spent"]
    _pg_consistent(stack, a)


def test_late_settle_never_overdraws(stack):
    """Points the sweeper gave back may be spent before the replay comes:
    the late charge takes what is available, never more."""
    _billing(stack)
    (a,) = _accounts(stack, 1, 10)
    u = _uid()
    r3, r4, r5 = (f"late-{i}-{u}" for i in (3, 4, 5))
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, r3, 8, 100, "device.command")[0] == 1
        assert red.reserve(a, r5, 1, 100, "device.read")[0] == 1
        _swept(stack, red, a, r3)
        _swept(stack, red, a, r5)
        # The sweeper's part is done; the outbox is read from here on.
        _stop_billing(stack)
        assert red.reserve(a, r4, 7, 600000, "device.command") == [1, 3, 7]
        assert red.settle(a, r3, 8, "late", 200) == [1, 3, 0]
        h = red.acct(a)
        assert h["credited"] - h["spent"] - h["held"] == 0, h
        # Nothing available at all: charged 0, no record, the mark consumed.
        n = len(records(stack))
        assert red.settle(a, r5, 1, "late", 200) == [1, 0, 0]
        assert len(records(stack)) == n and red.call("EXISTS", swept_key(a, r5)) == 0
        assert red.settle(a, r4, 7, "commit", 200) == [1, 7, 0]
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    assert stack.psql("select reservation_id, amount, outcome from charges where account_id = "
                      f"{a} order by 1") == [[r3, "3", "late"], [r4, "7", "commit"],
                                             [r5, "0", "expire"]]
    assert _pg_spent(stack, a) == 10 == stack.hot(a)["spent"]
    _pg_consistent(stack, a)


def test_late_records_in_any_order_apply_once(stack):
    """Settlement's side, with records written directly: a late record
    before its expire record inserts the row (the expire then changes
    nothing); both in one batch upgrade once; a late record whose row is a
    commit or a release changes nothing; a late record of 0 upgrades
    nothing."""
    (a,) = _accounts(stack, 1, 0)
    u = _uid()
    lo = {i: f"lo-{i}-{u}" for i in range(1, 6)}
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    ts = int(time.time() * 1000)
    try:
        outbox_add(red, ts, (lo[1], a, "device.read", 3, 3, "late", 200))
        outbox_add(red, ts, (lo[1], a, "device.read", 0, 3, "expire", 0))
        outbox_add(red, ts, (lo[2], a, "device.read", 0, 4, "expire", 0),
                   (lo[3], a, "device.read", 2, 2, "commit", 200),
                   (lo[4], a, "device.read", 0, 2, "release", 503),
                   (lo[5], a, "device.read", 0, 2, "expire", 0))
        outbox_add(red, ts, (lo[2], a, "device.read", 4, 4, "late", 200),
                   (lo[3], a, "device.read", 2, 2, "late", 200),
                   (lo[4], a, "device.read", 2, 2, "late", 200),
                   (lo[5], a, "device.read", 0, 2, "late", 200),
                   (lo[2], a, "device.read", 4, 4, "late", 200))
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    rows = stack.psql("select reservation_id, amount, outcome from charges where account_id = "
                      f"{a} order by 1")
    assert rows == [[lo[1], "3", "late"], [lo[2], "4", "late"], [lo[3], "2", "commit"],
                    [lo[4], "0", "release"], [lo[5], "0", "expire"]], rows
    assert _pg_spent(stack, a) == 9
    assert _usage_totals(stack, a) == (5, 9, 2)
    _pg_consistent(stack, a)


# ---- the backlog count -----------------------------------------------------
def _backlog_and_pending(red):
    """pg:backlog and the records the outbox holds, read in one atomic step."""
    return red.call("EVAL", """
        local n = 0
        for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
            n = n + #e[2] / 2 - 1
        end
        return {tonumber(redis.call('GET', KEYS[2]) or '0'), n}""", 2, OUTBOX, BACKLOG)


def test_outbox_ack_uncounts_an_entry_once(stack):
    """outbox_ack.lua (settlement's acknowledgement): an entry delivered
    twice is uncounted once; the count never goes below 0."""
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    try:
        red.call("DEL", OUTBOX, BACKLOG)
        red.pipeline([("XGROUP", "CREATE", OUTBOX, "settle", "0", "MKSTREAM")])
        u = _uid()
        ids = [outbox_add(red, 1, *[(f"ack-{u}-{i}-{k}", 1, "r", 1, 1, "commit", 200)
                                    for k in range(i + 1)]) for i in range(3)]
        assert red.backlog() == 6
        red.call("XREADGROUP", "GROUP", "settle", "t", "COUNT", 10, "STREAMS", OUTBOX, ">")
        sha = red.call("SCRIPT", "LOAD", script_source("outbox_ack"))
        assert red.call("EVALSHA", sha, 2, OUTBOX, BACKLOG, "settle", ids[0], 1, ids[2], 3) == \
            [2, 4, 2]
        # The same two again (a second worker, a redelivery): nothing more.
        assert red.call("EVALSHA", sha, 2, OUTBOX, BACKLOG, "settle", ids[0], 1, ids[2], 3) == \
            [0, 0, 2]
        assert red.call("XLEN", OUTBOX) == 1 and red.call("XPENDING", OUTBOX, "settle")[0] == 1
        red.call("SET", BACKLOG, 1)  # a count that fell behind: floored at 0
        assert red.call("EVALSHA", sha, 2, OUTBOX, BACKLOG, "settle", ids[1], 2) == [1, 2, 0]
        assert red.backlog() == 0
        bad = red.pipeline([("EVALSHA", sha, 2, OUTBOX, BACKLOG, "settle", "x", 1)])[0]
        assert "stream ids" in str(bad), bad
    finally:
        red.close()
    _billing(stack)


def test_backlog_counts_pending_records_through_kill9(stack):
    """pg:backlog equals the records in the outbox at every moment, through
    a burst while billing is down, kill -9 of billing mid-backlog (several
    times) and the drain, after which it is 0."""
    accts = _accounts(stack, 2, 10**9)
    base = _snapshot(stack, accts)
    u = _uid()
    _drain(stack)
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    try:
        assert _backlog_and_pending(red) == [0, 0]
        exp = _run_plan(stack, _plan(random.Random(11), accts, 6000, f"bl-{u}"), chunk=1000)
        # Batched settles too: entries of 20 records.
        ops = [(accts[0], f"bl-{u}-b{i}", 1, 600000, "device.read") for i in range(2000)]
        for i in range(0, 2000, 20):
            red.call(*red.reserve_batch_cmd(ops[i:i + 20]))
            red.call(*red.settle_batch_cmd([(o[0], o[1], 1, "commit", 200) for o in ops[i:i + 20]]))
        exp = _merge(exp, {accts[0]: [2000, 2000, 0]})
        assert _backlog_and_pending(red) == [8000, 8000]
        assert int(stack.redis_raw("XLEN", OUTBOX)) == 6100

        def settled():
            return int(stack.scalar("select count(*) from charges where reservation_id like "
                                    f"'bl-{u}-%'"))

        kills = 0
        for round_ in range(3):
            before = settled()
            if before >= 8000:
                break
            p = _billing(stack, {"SETTLE_BATCH": "100"})
            stack.wait_for(lambda: settled() > before, timeout=30, what="settlement progress")
            time.sleep(random.Random(round_).uniform(0.0, 0.1))
            p.kill9()
            got = _backlog_and_pending(red)
            assert got[0] == got[1], got
            kills += settled() < 8000
        assert kills >= 1, "billing finished before it could be killed; the test proved nothing"
        # Traffic while it drains: still equal at every sample, 0 at the end.
        _billing(stack)
        more = _plan(random.Random(12), accts, 1000, f"bm-{u}")
        samples = []
        for i in range(0, 1000, 100):
            exp = _merge(exp, _run_plan(stack, more[i:i + 100], chunk=100))
            samples.append(_backlog_and_pending(red))
        assert all(x[0] == x[1] for x in samples), samples
        _drain(stack, timeout=120)
        assert _backlog_and_pending(red) == [0, 0]
        assert red.backlog() == 0
    finally:
        red.close()
    _assert_conserved(stack, exp, base)


# ---- calls Postgres refuses as data ----------------------------------------
def test_data_errors_dead_letter_only_the_bad_calls(stack):
    """A batch with calls Postgres refuses as data (a numeric overflow, a
    timestamp out of range, bytes that are not UTF-8, an unknown outcome,
    an account it does not know) among good ones: the batch is split until
    the bad calls stand alone; they go to the dead-letter stream with the
    reason, everything else lands once, and settlement goes on."""
    (a,) = _accounts(stack, 1, 1000)
    u = _uid()
    bad = {k: f"bad-{k}-{u}" for k in ("overflow", "time", "outcome", "utf8", "ghost", "late")}
    _stop_billing(stack)
    red = Redis(stack.redis_port)
    ts = int(time.time() * 1000)
    goods = []
    try:
        red.call("DEL", "pg:outbox:dead")

        def good(i):
            rid = f"dg-{u}-{i}"
            assert red.reserve(a, rid, 2)[0] == 1
            assert red.settle(a, rid, 2)[:2] == [1, 2]
            goods.append(rid)

        for i in range(10):
            good(i)
        outbox_add(red, ts, (bad["overflow"], a, "device.read", 2**63 - 1, 1, "commit", 200))
        for i in range(10, 20):
            good(i)
        outbox_add(red, 10**17, (bad["time"], a, "device.read", 1, 1, "commit", 200))
        outbox_add(red, ts, (bad["outcome"], a, "device.read", 1, 1, "bogus", 200))
        red.call("EVAL", "local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV))\n"
                 "redis.call('INCRBY', KEYS[2], 1)\nreturn id", 2, OUTBOX, BACKLOG,
                 "ts", str(ts), "c",
                 bad["utf8"].encode() + b"|" + str(a).encode() + b"|dev\xff\xfe|1|1|commit|200")
        for i in range(20, 30):
            good(i)
        outbox_add(red, ts, (bad["ghost"], 999999999, "device.read", 1, 1, "commit", 200),
                   (bad["late"], a, "device.read", 2**63 - 1, 1, "late", 200))
        for i in range(30, 40):
            good(i)
    finally:
        red.close()
    _billing(stack)
    _drain(stack)
    assert _charges(stack, a) == (40, 80)
    assert _pg_spent(stack, a) == 80 == stack.hot(a)["spent"]
    _pg_consistent(stack, a)
    dead = {f["rid"]: f for _, f in entries(stack, "pg:outbox:dead")}
    assert sorted(dead) == sorted(bad.values()), dead
    dead = {k: dead[v] for k, v in bad.items()}
    assert dead["overflow"]["why"] == "data" and dead["overflow"]["error"].startswith("22003")
    assert dead["time"]["error"].startswith("22008"), dead["time"]
    assert dead["utf8"]["error"].startswith("22021"), dead["utf8"]
    assert dead["outcome"]["why"] == "integrity", dead["outcome"]
    assert dead["ghost"]["why"] == "integrity" and dead["ghost"]["error"].startswith("23503")
    assert dead["late"]["error"].startswith("22003"), dead["late"]
    assert stack.scalar("select count(*) from charges where reservation_id like "
                        f"'bad-%-{u}'") == "0"
    assert stack.redis_raw("GET", BACKLOG) == "0"
    # Settlement goes on.
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(a, f"dg-{u}-after", 3)[0] == 1
        assert red.settle(a, f"dg-{u}-after", 3)[:2] == [1, 3]
    finally:
        red.close()
    stack.wait_for(lambda: _charges(stack, a) == (41, 83), timeout=20, what="settled after")
