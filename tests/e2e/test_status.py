"""`billing status` and GET /v1/status (billing/status.c) on the real stack.

Proves: the CLI and the API give the same report; a clean system shows no
mismatch (exit 0); spent or credited changed in Redis behind billing's back
is listed with the exact difference (exit 5); calls answered but still in
the outbox (billing serve stopped) are explained by the backlog and not
listed; dead letters give exit 5 and a store away exit 1; finance tokens
may read it, a gateway API key and no token may not.
"""
import json
import time
import uuid

from harness import FINANCE_TOKEN
from luahelp import Redis, acct_key, outbox_add


def _billing(stack):
    if stack.billing is None or not stack.billing.alive():
        stack.start_billing()
    return stack.billing


def _stop_billing(stack):
    for p in stack.procs:
        if p.name == "billing" and p.alive():
            assert p.stop() == 0, p.output()[-3000:]


def _cli(stack):
    p = stack.run_billing("status", "--json", check=False)
    assert p.returncode in (0, 1, 5), (p.returncode, p.stderr)
    return p.returncode, json.loads(p.stdout)


def _mismatch(report, acct):
    return [m for m in report["reconcile"]["mismatches"] if m["account_id"] == acct]


def _calls(stack, acct, n, price=3):
    """N calls reserved and settled through the real scripts (as a gateway)."""
    red = Redis(stack.redis_port)
    try:
        for i in range(n):
            rid = f"st-{uuid.uuid4().hex[:10]}"
            assert red.reserve(acct, rid, price)[0] == 1
            assert red.settle(acct, rid, price)[:2] == [1, price]
    finally:
        red.close()


def test_clean_system_cli_and_api_agree(stack):
    _billing(stack)
    a, _ = stack.new_account_in_redis(100)
    _calls(stack, a, 4)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    rc, rep = _cli(stack)
    assert rc == 0, rep
    assert rep["verdict"] == "healthy"
    assert rep["redis"] == {"reachable": True, "error": None}
    assert rep["postgres"] == {"reachable": True, "error": None}
    assert rep["outbox"]["backlog_records"] == 0 and rep["outbox"]["entries"] == 0
    assert rep["outbox"]["pending_claims"] == 0 and rep["outbox"]["oldest_age_seconds"] == 0
    assert rep["dead_letters"] == 0
    assert rep["reconcile"]["mismatches"] == [] and rep["reconcile"]["error"] is None
    assert rep["reconcile"]["accounts_checked"] >= 1
    assert rep["reconcile"]["spent_checked"] is True
    api = stack.admin("GET", "/v1/status")
    assert api.status == 200, api
    body = api.json()
    for k in ("redis", "postgres", "outbox", "dead_letters", "leases", "verdict"):
        assert body[k] == rep[k], k
    assert body["reconcile"]["mismatches"] == rep["reconcile"]["mismatches"]
    assert body["reconcile"]["accounts_checked"] == rep["reconcile"]["accounts_checked"]
    # Tables by default.
    p = stack.run_billing("status", check=False)
    assert p.returncode == 0
    assert "RECONCILE" in p.stdout and "postgres  yes" in p.stdout, p.stdout


def test_who_may_read_it(stack):
    _billing(stack)
    _, key = stack.new_account(5)
    assert stack.admin("GET", "/v1/status", token=FINANCE_TOKEN).status == 200
    assert stack.admin("GET", "/v1/status", token=key).status == 401
    assert stack.admin("GET", "/v1/status", token=None).status == 401
    assert stack.admin("POST", "/v1/status", {}).status == 405
    assert stack.admin("POST", "/v1/status", {}, token=FINANCE_TOKEN).status == 403


def test_injected_spent_and_credited_mismatches_are_listed_exactly(stack):
    _billing(stack)
    a, _ = stack.new_account_in_redis(50)
    b, _ = stack.new_account_in_redis(50)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    stack.redis("HINCRBY", acct_key(a), "spent", 7)
    stack.redis("HINCRBY", acct_key(b), "credited", 3)
    try:
        rc, rep = _cli(stack)
        assert rc == 5, rep
        assert rep["verdict"] == "attention"
        (m,) = _mismatch(rep, a)
        assert m["redis_spent"] - m["pg_spent"] == 7 and m["outbox_pending"] == 0, m
        assert m["difference"] == 7 and m["credited_difference"] == 0, m
        assert m["problem"] == "spent"
        (m,) = _mismatch(rep, b)
        assert m["redis_credited"] == 53 and m["pg_credited"] == 50, m
        assert m["credited_difference"] == 3 and m["difference"] == 0, m
        assert m["problem"] == "credited"
        api = stack.admin("GET", "/v1/status", token=FINANCE_TOKEN).json()
        assert _mismatch(api, a) == _mismatch(rep, a) and _mismatch(api, b) == _mismatch(rep, b)
    finally:
        stack.redis("HINCRBY", acct_key(a), "spent", -7)
        stack.redis("HINCRBY", acct_key(b), "credited", -3)
    rc, rep = _cli(stack)
    assert rc == 0 and not _mismatch(rep, a) and not _mismatch(rep, b), rep


def test_calls_still_in_the_outbox_are_explained_by_the_backlog(stack):
    _billing(stack)
    a, _ = stack.new_account_in_redis(100)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    _stop_billing(stack)
    try:
        _calls(stack, a, 5, price=2)
        rc, rep = _cli(stack)
        assert rc == 0, rep
        assert rep["outbox"]["backlog_records"] == 5 and rep["outbox"]["entries"] == 5, rep
        assert rep["outbox"]["oldest_age_seconds"] >= 0
        assert _mismatch(rep, a) == []
        assert rep["reconcile"]["outbox_records_read"] == 5
        # A real difference on top of the backlog is still exact.
        stack.redis("HINCRBY", acct_key(a), "spent", 4)
        rc, rep = _cli(stack)
        assert rc == 5
        (m,) = _mismatch(rep, a)
        assert m["outbox_pending"] == 10 and m["redis_spent"] - m["pg_spent"] == 14, m
        assert m["difference"] == 4, m
        stack.redis("HINCRBY", acct_key(a), "spent", -4)
    finally:
        _billing(stack)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    rc, rep = _cli(stack)
    assert rc == 0 and rep["outbox"]["backlog_records"] == 0, rep


def test_holds_and_leases_are_reported(stack):
    _billing(stack)
    a, _ = stack.new_account_in_redis(100)
    red = Redis(stack.redis_port)
    rid = f"h-{uuid.uuid4().hex[:8]}"
    try:
        assert red.reserve(a, rid, 6, 600000)[0] == 1
        rc, rep = _cli(stack)
        h = rep["holds"]
        assert h["open"] >= 1 and h["accounts_with_holds"] >= 1, h
        assert h["oldest_age_seconds"] is None  # not knowable: deadlines only
        assert 500 < h["earliest_deadline_in_seconds"] <= 600, h
        assert h["earliest_deadline_account"] == a
        assert rep["leases"]["count"] >= 0
    finally:
        red.settle(a, rid, 0, "release", 0)
        red.close()


def test_dead_letters_and_unreachable_stores_set_the_exit_code(stack):
    _billing(stack)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    red = Redis(stack.redis_port)
    try:
        red.call("DEL", "pg:outbox:dead")
        outbox_add(red, int(time.time() * 1000),
                   (f"ghost-{uuid.uuid4().hex[:8]}", 999999999, "device.read", 4, 4, "commit", 200))
        stack.wait_for(lambda: red.call("XLEN", "pg:outbox:dead") == 1, timeout=20,
                       what="dead letter")
    finally:
        red.close()
    rc, rep = _cli(stack)
    assert rc == 5 and rep["dead_letters"] == 1, rep
    stack.redis("DEL", "pg:outbox:dead")
    rc, rep = _cli(stack)
    assert rc == 0, rep
    stack.service("redis-stop")
    try:
        rc, rep = _cli(stack)
        assert rc == 1, rep
        assert rep["redis"]["reachable"] is False and rep["redis"]["error"], rep
        assert rep["postgres"]["reachable"] is True
        # The API reports it too (its own Redis client fails the same way).
        body = stack.admin("GET", "/v1/status").json()
        assert body["redis"]["reachable"] is False and body["verdict"] == "unreachable"
    finally:
        stack.service("redis-start")
    stack.service("pg-stop")
    try:
        rc, rep = _cli(stack)
        assert rc == 1 and rep["postgres"]["reachable"] is False, rep
        assert rep["postgres"]["error"], rep
    finally:
        stack.service("pg-start")
