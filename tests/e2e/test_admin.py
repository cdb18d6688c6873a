"""The admin and finance API of `billing serve` (DESIGN.md, "Admin and finance
API"): every call's success and failure answers, checked against what lands in
Postgres and in Redis; credit sync order-proofness and the repair pass.

Every refusal must be a 4xx JSON body {"error","message"} that changes nothing.
"""
import hashlib
import json
import os
import subprocess
import time

from harness import ADMIN_TOKEN, FINANCE_TOKEN, PEPPER, http
from luahelp import OUTBOX, Redis, acct_key, holds_key, run_threads

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"


# ---- helpers ---------------------------------------------------------------
def _billing(stack):
    if stack.billing is None or not stack.billing.alive():
        stack.start_billing()


def _err(r, status, code=None):
    assert r.status == status, r
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], r
    assert isinstance(body.get("message"), str) and body["message"], r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    if code:
        assert body["error"] == code, r
    return body


def _count(stack, table):
    return int(stack.scalar(f"select count(*) from {table}"))


def _account(stack, points=0, name="acme"):
    acct, _ = stack.new_account(points, name)
    return acct


def _pg_acct(stack, acct):
    row = stack.psql(f"select credited, spent, credit_seq from accounts where id = {acct}")[0]
    return {"credited": int(row[0]), "spent": int(row[1]), "seq": int(row[2])}


def _key_hash(api_key):
    pepper = hashlib.blake2b(PEPPER.encode(), digest_size=32).digest()
    return hashlib.blake2b(api_key.encode(), digest_size=32, key=pepper).hexdigest()


def _topup(stack, acct, amount, reference, **kw):
    return stack.admin("POST", f"/v1/accounts/{acct}/topups",
                       {"amount": amount, "reference": reference}, **kw)


def _adjust(stack, acct, amount, reason="correction", **kw):
    body = {"amount": amount}
    if reason is not None:
        body["reason"] = reason
    return stack.admin("POST", f"/v1/accounts/{acct}/adjustments", body, **kw)


def _assert_synced(stack, acct):
    pg = _pg_acct(stack, acct)
    hot = stack.hot(acct)
    assert hot.get("credited") == pg["credited"], (hot, pg)
    assert hot.get("seq") == pg["seq"], (hot, pg)
    return pg, hot


# ---- accounts --------------------------------------------------------------
def test_create_account(stack):
    _billing(stack)
    r = stack.admin("POST", "/v1/accounts", {"name": "Acme Devices"})
    assert r.status == 201, r
    j = r.json()
    assert isinstance(j["id"], int) and j["id"] > 0
    assert j["name"] == "Acme Devices"
    assert (j["credited"], j["spent"], j["balance"]) == (0, 0, 0)
    assert stack.scalar(f"select name from accounts where id = {j['id']}") == "Acme Devices"
    # Pushed to Redis at once: known with 0 points, not "unknown".
    assert stack.hot(j["id"]) == {"credited": 0, "seq": 0, "spent": 0, "held": 0}
    # The longest name accepted is 200 characters.
    r = stack.admin("POST", "/v1/accounts", {"name": "n" * 200})
    assert r.status == 201, r
    assert r.json()["name"] == "n" * 200


def test_create_account_bad_input(stack):
    _billing(stack)
    before = _count(stack, "accounts")
    bad = [
        {},
        {"name": ""},
        {"name": 42},
        {"name": None},
        {"name": ["x"]},
        {"name": {"first": "x"}},
        {"name": "n" * 201},
        {"name": "tab\there"},
        {"nom": "acme"},
    ]
    for body in bad:
        _err(stack.admin("POST", "/v1/accounts", body), 400, "bad_request")
    raw = [
        b'{"name":',
        b'{"name": "acme"',
        b'not json',
        b'["acme"]',
        b'"acme"',
        b'42',
        b'null',
        b'',
        b'{"name":"a","name":"b"}',
    ]
    for body in raw:
        r = stack.admin("POST", "/v1/accounts", body, headers={"Content-Type": "application/json"})
        _err(r, 400, "bad_request")
    # No body at all (no Content-Length).
    _err(stack.admin("POST", "/v1/accounts"), 400, "bad_request")
    assert _count(stack, "accounts") == before


def test_get_account(stack):
    _billing(stack)
    acct = _account(stack, 1000)
    assert _adjust(stack, acct, -100, "refund reversal").status == 201
    r = stack.admin("GET", f"/v1/accounts/{acct}")
    assert r.status == 200, r
    j = r.json()
    assert j["id"] == acct and j["name"] == "acme"
    assert (j["credited"], j["spent"], j["balance"]) == (900, 0, 900)
    assert (j["available"], j["held"], j["live"]) == (900, 0, True)
    # Spent from Postgres, held live from Redis.
    stack.psql(f"update accounts set spent = 50 where id = {acct}")
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(acct, "get-account-hold", 30)[0] == 1
        j = stack.admin("GET", f"/v1/accounts/{acct}").json()
        assert (j["credited"], j["spent"], j["balance"]) == (900, 50, 850), j
        assert (j["available"], j["held"]) == (870, 30), j
        assert red.settle(acct, "get-account-hold", 0, "release", 500)[0] == 1
    finally:
        red.close()
    stack.wait_for(stack.drained, what="outbox drained")
    stack.psql(f"update accounts set spent = 0 where id = {acct}")
    # Redis does not know the account: says so instead of guessing.
    stack.redis("DEL", acct_key(acct))
    j = stack.admin("GET", f"/v1/accounts/{acct}").json()
    assert (j["available"], j["held"], j["live"]) == (None, None, False), j
    assert j["balance"] == 900
    stack.run_billing("repair")
    assert stack.admin("GET", f"/v1/accounts/{acct}").json()["available"] == 900
    # Unknown, zero, negative, non-numeric, too long ids: 404.
    for ident in ["999999999", "0", "-1", "abc", "12abc", "1.5", "9" * 19]:
        _err(stack.admin("GET", f"/v1/accounts/{ident}"), 404, "not_found")
    _err(stack.admin("GET", "/v1/accounts/"), 404)


# ---- keys ------------------------------------------------------------------
def test_create_key_stores_only_hash(stack):
    _billing(stack)
    acct = _account(stack)
    r = stack.admin("POST", f"/v1/accounts/{acct}/keys")
    assert r.status == 201, r
    j = r.json()
    key, key_id = j["api_key"], j["key_id"]
    assert isinstance(key_id, int) and key_id > 0
    assert key.startswith("pgk_") and len(key) == 47, key
    assert all(c.isalnum() or c in "-_" for c in key[4:]), key
    # A second key differs.
    key2 = stack.admin("POST", f"/v1/accounts/{acct}/keys").json()["api_key"]
    assert key2 != key
    # Postgres holds the keyed BLAKE2b hash, never the key.
    h = _key_hash(key)
    assert stack.scalar(f"select key_hash from api_keys where id = {key_id}") == h
    assert stack.scalar(f"select account_id from api_keys where id = {key_id}") == str(acct)
    assert stack.scalar(f"select revoked_at is null from api_keys where id = {key_id}") == "t"
    for k in (key, key[4:], key[4:30]):
        assert stack.scalar(
            f"select count(*) from api_keys where key_hash like '%{k}%'") == "0"
    if os.path.exists(PG_DUMP):
        p = subprocess.run([PG_DUMP, stack.env["DATABASE_URL"]], capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr
        dump = p.stdout
        assert h.encode() in dump  # the dump does contain the keys
        assert key.encode() not in dump and key[4:].encode() not in dump
    # Redis: the hash mirror maps to the account; the key itself is nowhere.
    assert stack.redis_raw("GET", f"pg:key:{h}").split("|")[0] == str(acct)
    red = Redis(stack.redis_port)
    try:
        names = []
        cursor = "0"
        while True:
            cursor, batch = red.call("SCAN", cursor, "COUNT", 1000)
            names += batch
            if cursor == "0":
                break
        assert f"pg:key:{h}" in names
        for name in names:
            assert key[4:] not in name
            t = red.call("TYPE", name)
            if t == "string":
                vals = [red.call("GET", name)]
            elif t == "hash":
                vals = red.call("HGETALL", name)
            elif t == "zset":
                vals = red.call("ZRANGE", name, 0, -1)
            elif t == "stream":
                vals = [json.dumps(red.call("XRANGE", name, "-", "+"))]
            else:
                vals = []
            for v in vals:
                assert key[4:] not in str(v), (name, v)
    finally:
        red.close()
    # Nor in the billing log.
    assert key[4:] not in stack.billing.output()


def test_create_key_unknown_account(stack):
    _billing(stack)
    before = _count(stack, "api_keys")
    _err(stack.admin("POST", "/v1/accounts/999999999/keys"), 404, "not_found")
    _err(stack.admin("POST", "/v1/accounts/abc/keys"), 404, "not_found")
    assert _count(stack, "api_keys") == before


def test_revoke_key(stack):
    _billing(stack)
    acct = _account(stack)
    j = stack.admin("POST", f"/v1/accounts/{acct}/keys").json()
    key_id, h = j["key_id"], _key_hash(j["api_key"])
    other = stack.admin("POST", f"/v1/accounts/{acct}/keys").json()
    assert stack.redis_raw("EXISTS", f"pg:key:{h}") == "1"
    r = stack.admin("DELETE", f"/v1/keys/{key_id}")
    assert r.status == 204, r
    assert r.body == b""
    # The tombstone (hotkeys.h): no push of a live key overwrites it.
    assert stack.redis_raw("GET", f"pg:key:{h}") == "-1"
    revoked = stack.scalar(f"select revoked_at from api_keys where id = {key_id}")
    assert revoked
    # The other key of the account is untouched.
    assert stack.redis_raw("GET", f"pg:key:{_key_hash(other['api_key'])}").split("|")[0] == str(acct)
    assert stack.scalar(f"select revoked_at is null from api_keys where id = {other['key_id']}") == "t"
    # Idempotent: 204 again, revoked_at unchanged, still gone from Redis.
    time.sleep(0.01)
    assert stack.admin("DELETE", f"/v1/keys/{key_id}").status == 204
    assert stack.scalar(f"select revoked_at from api_keys where id = {key_id}") == revoked
    assert stack.redis_raw("GET", f"pg:key:{h}") == "-1"
    # A repair pass does not bring a revoked key back, and tombstones a stale
    # mirror (a revoke whose Redis write was lost) or a missing one.
    stack.redis("SET", f"pg:key:{h}", acct)
    stack.run_billing("repair")
    assert stack.redis_raw("GET", f"pg:key:{h}") == "-1"
    stack.redis("DEL", f"pg:key:{h}")
    stack.run_billing("repair")
    assert stack.redis_raw("GET", f"pg:key:{h}") == "-1"
    # A DELETE again rewrites the tombstone too (idempotent on both stores).
    stack.redis("SET", f"pg:key:{h}", acct)
    assert stack.admin("DELETE", f"/v1/keys/{key_id}").status == 204
    assert stack.redis_raw("GET", f"pg:key:{h}") == "-1"
    for ident in ["999999999", "0", "abc"]:
        _err(stack.admin("DELETE", f"/v1/keys/{ident}"), 404, "not_found")


# ---- top-ups ---------------------------------------------------------------
def test_topup(stack):
    _billing(stack)
    acct = _account(stack)
    r = _topup(stack, acct, 500, "inv-1")
    assert r.status == 201, r
    e = r.json()
    assert e["account_id"] == acct and e["kind"] == "topup" and e["amount"] == 500
    assert e["reference"] == "inv-1" and e["reason"] is None
    assert e["credit_seq"] == 1 and e["credited_after"] == 500
    assert isinstance(e["operator"], str) and e["operator"] and e["created_at"]
    assert _pg_acct(stack, acct) == {"credited": 500, "spent": 0, "seq": 1}
    assert stack.hot(acct) == {"credited": 500, "seq": 1, "spent": 0, "held": 0}
    # Same reference again: 200, the same entry, no second credit.
    r = _topup(stack, acct, 500, "inv-1")
    assert r.status == 200, r
    assert r.json() == e
    assert _pg_acct(stack, acct)["credited"] == 500
    assert stack.hot(acct)["credited"] == 500
    assert stack.scalar(f"select count(*) from ledger_entries where account_id = {acct}") == "1"
    # Same reference, other terms: 409, nothing changed.
    _err(_topup(stack, acct, 501, "inv-1"), 409, "conflict")
    _err(stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                     {"amount": 500, "reason": "x", "reference": "inv-1"}), 409, "conflict")
    # The same reference on another account is another top-up.
    acct2 = _account(stack)
    assert _topup(stack, acct2, 7, "inv-1").status == 201
    # 10^12 exactly is accepted.
    r = _topup(stack, acct, 10**12, "inv-max")
    assert r.status == 201, r
    assert r.json()["credited_after"] == 10**12 + 500
    assert _pg_acct(stack, acct) == {"credited": 10**12 + 500, "spent": 0, "seq": 2}
    _assert_synced(stack, acct)
    assert stack.hot(acct2)["credited"] == 7


def test_topup_bad_input(stack):
    _billing(stack)
    acct = _account(stack, 10)
    entries = _count(stack, "ledger_entries")
    pg = _pg_acct(stack, acct)
    hot = stack.hot(acct)
    path = f"/v1/accounts/{acct}/topups"
    bad = [
        {"amount": 0, "reference": "b1"},
        {"amount": -5, "reference": "b2"},
        {"amount": 10**12 + 1, "reference": "b3"},
        {"amount": 2**63 - 1, "reference": "b3b"},
        {"amount": 1.5, "reference": "b4"},
        {"amount": 1.0, "reference": "b4b"},
        {"amount": "10", "reference": "b5"},
        {"amount": True, "reference": "b6"},
        {"amount": None, "reference": "b7"},
        {"reference": "b8"},
        {"amount": 10},
        {"amount": 10, "reference": ""},
        {"amount": 10, "reference": 12},
        {"amount": 10, "reference": None},
        {"amount": 10, "reference": "r" * 201},
    ]
    for body in bad:
        _err(stack.admin("POST", path, body), 400, "bad_request")
    for raw in [b"", b"{", b"[1]", b'{"amount": 1e3, "reference": "b9"}',
                b'{"amount": 99999999999999999999999, "reference": "b10"}']:
        _err(stack.admin("POST", path, raw), 400, "bad_request")
    # Unknown account: 404 and nothing written.
    _err(_topup(stack, 999999999, 10, "b11"), 404, "not_found")
    assert _count(stack, "ledger_entries") == entries
    assert _pg_acct(stack, acct) == pg
    assert stack.hot(acct) == hot
    assert stack.redis_raw("EXISTS", acct_key(999999999)) == "0"


def test_concurrent_duplicate_topups_credit_once(stack):
    _billing(stack)
    acct = _account(stack)
    results = run_threads(20, lambda i: _topup(stack, acct, 777, "same-ref"))
    statuses = sorted(r.status for r in results)
    assert statuses == [200] * 19 + [201], statuses
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1, ids
    assert _pg_acct(stack, acct) == {"credited": 777, "spent": 0, "seq": 1}
    assert stack.scalar(f"select count(*) from ledger_entries where account_id = {acct}") == "1"
    assert stack.hot(acct) == {"credited": 777, "seq": 1, "spent": 0, "held": 0}
    # Twenty concurrent distinct references: twenty credits, gap-free seqs.
    results = run_threads(20, lambda i: _topup(stack, acct, 10 + i, f"ref-{i}"))
    assert all(r.status == 201 for r in results), results
    total = 777 + sum(10 + i for i in range(20))
    assert _pg_acct(stack, acct) == {"credited": total, "spent": 0, "seq": 21}
    seqs = [int(s[0]) for s in stack.psql(
        f"select credit_seq from ledger_entries where account_id = {acct} order by credit_seq")]
    assert seqs == list(range(1, 22))
    stack.wait_for(lambda: stack.hot(acct).get("seq") == 21, what="redis seq 21")
    assert stack.hot(acct)["credited"] == total


# ---- adjustments -----------------------------------------------------------
def test_adjustments(stack):
    _billing(stack)
    acct = _account(stack, 100)
    r = _adjust(stack, acct, 25, "goodwill")
    assert r.status == 201, r
    e = r.json()
    assert e["kind"] == "adjustment" and e["amount"] == 25 and e["reason"] == "goodwill"
    assert e["reference"] is None and e["credited_after"] == 125
    r = _adjust(stack, acct, -40, "duplicate top-up")
    assert r.status == 201, r
    assert r.json()["amount"] == -40 and r.json()["credited_after"] == 85
    pg, hot = _assert_synced(stack, acct)
    assert pg == {"credited": 85, "spent": 0, "seq": 3}
    assert hot["held"] == 0
    assert stack.redis_raw("HLEN", holds_key(acct)) == "0"  # the guard hold is gone
    # Adjustments with a reference are idempotent too.
    r1 = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                     {"amount": -5, "reason": "fee", "reference": "adj-1"})
    r2 = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                     {"amount": -5, "reason": "fee", "reference": "adj-1"})
    assert (r1.status, r2.status) == (201, 200), (r1, r2)
    assert r1.json()["id"] == r2.json()["id"]
    assert _pg_acct(stack, acct)["credited"] == 80
    assert stack.redis_raw("HLEN", holds_key(acct)) == "0"
    # Bad input.
    entries = _count(stack, "ledger_entries")
    path = f"/v1/accounts/{acct}/adjustments"
    for body in [{"amount": 5}, {"amount": 5, "reason": ""}, {"amount": 5, "reason": 5},
                 {"amount": 5, "reason": "r" * 501}, {"amount": 0, "reason": "x"},
                 {"amount": 10**12 + 1, "reason": "x"}, {"amount": -10**12 - 1, "reason": "x"},
                 {"amount": -1.5, "reason": "x"}, {"amount": "-5", "reason": "x"},
                 {"reason": "x"}]:
        _err(stack.admin("POST", path, body), 400, "bad_request")
    _err(_adjust(stack, 999999999, 5), 404, "not_found")
    _err(_adjust(stack, 999999999, -5), 404, "not_found")
    assert _count(stack, "ledger_entries") == entries
    # The full balance can be taken back, not one point more.
    r = _adjust(stack, acct, -81, "too much")
    _err(r, 409, "insufficient_points")
    assert _pg_acct(stack, acct) == {"credited": 80, "spent": 0, "seq": 4}
    assert stack.hot(acct) == {"credited": 80, "seq": 4, "spent": 0, "held": 0}
    assert stack.redis_raw("HLEN", holds_key(acct)) == "0"
    assert _count(stack, "ledger_entries") == entries
    assert _adjust(stack, acct, -80, "close account").status == 201
    assert _pg_acct(stack, acct)["credited"] == 0
    assert stack.hot(acct) == {"credited": 0, "seq": 5, "spent": 0, "held": 0}


def test_negative_adjustment_respects_spent_in_postgres(stack):
    _billing(stack)
    acct = _account(stack, 100)
    # Charges settled in Postgres count: spent 70 leaves 30 to take back.
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(acct, "spend-70", 70)[0] == 1
        assert red.settle(acct, "spend-70", 70)[:2] == [1, 70]
    finally:
        red.close()
    stack.wait_for(lambda: _pg_acct(stack, acct)["spent"] == 70, what="charge settled")
    _err(_adjust(stack, acct, -31, "x"), 409, "insufficient_points")
    assert stack.hot(acct) == {"credited": 100, "seq": 1, "spent": 70, "held": 0}
    r = _adjust(stack, acct, -30, "x")
    assert r.status == 201, r
    assert stack.hot(acct) == {"credited": 70, "seq": 2, "spent": 70, "held": 0}
    assert _pg_acct(stack, acct) == {"credited": 70, "spent": 70, "seq": 2}


def test_negative_adjustment_cannot_take_held_points(stack):
    _billing(stack)
    acct = _account(stack, 10)
    red = Redis(stack.redis_port)
    try:
        # A call in flight holds 8 of the 10 points.
        assert red.reserve(acct, "inflight-1", 8, 60000, "device.command") == [1, 2, 8]
        # Postgres alone would allow -5 (credited 10, spent 0); the hold forbids it.
        _err(_adjust(stack, acct, -5, "chargeback"), 409, "insufficient_points")
        assert _pg_acct(stack, acct) == {"credited": 10, "spent": 0, "seq": 1}
        assert stack.hot(acct) == {"credited": 10, "seq": 1, "spent": 0, "held": 8}
        assert red.call("HKEYS", holds_key(acct)) == ["inflight-1"]
        # -2 fits in what is available.
        assert _adjust(stack, acct, -2, "chargeback").status == 201
        assert stack.hot(acct) == {"credited": 8, "seq": 2, "spent": 0, "held": 8}
        assert red.call("HKEYS", holds_key(acct)) == ["inflight-1"]
        # Nothing left: -1 refused while the call is in flight...
        _err(_adjust(stack, acct, -1, "chargeback"), 409, "insufficient_points")
        # ...and allowed once it is released.
        assert red.settle(acct, "inflight-1", 0, "release", 503)[0] == 1
        assert _adjust(stack, acct, -3, "chargeback").status == 201
        hot = stack.hot(acct)
        assert hot == {"credited": 5, "seq": 3, "spent": 0, "held": 0}, hot
        assert red.call("HLEN", holds_key(acct)) == 0
    finally:
        red.close()
    stack.wait_for(stack.drained, what="outbox drained")
    # The guard holds of adjustments are not calls: no charge rows for them.
    assert stack.scalar(f"select count(*) from charges where account_id = {acct}") == "1"
    assert stack.scalar(f"select count(*) from charges where route like '\\_%'") == "0"


# ---- ledger listing --------------------------------------------------------
def test_ledger_listing_and_paging(stack):
    _billing(stack)
    acct = _account(stack)
    made = []
    for i in range(11):
        if i % 3 == 2:
            r = _adjust(stack, acct, -1, f"fix {i}")
        else:
            r = _topup(stack, acct, 10 + i, f"page-{i}")
        assert r.status == 201, r
        made.append(r.json())
    newest_first = list(reversed(made))
    r = stack.admin("GET", f"/v1/accounts/{acct}/ledger")
    assert r.status == 200, r
    j = r.json()
    assert j["entries"] == newest_first
    assert j["next_before"] is None
    ids = [e["id"] for e in j["entries"]]
    assert ids == sorted(ids, reverse=True)
    # Page through four at a time.
    seen, before, pages = [], None, 0
    while True:
        q = f"/v1/accounts/{acct}/ledger?limit=4" + (f"&before={before}" if before else "")
        j = stack.admin("GET", q, token=FINANCE_TOKEN).json()
        pages += 1
        assert len(j["entries"]) <= 4
        seen += j["entries"]
        if j["next_before"] is None:
            break
        assert j["next_before"] == j["entries"][-1]["id"]
        before = j["next_before"]
        assert pages < 10
    assert seen == newest_first and pages == 3
    # limit=1 and a cursor in the middle.
    j = stack.admin("GET", f"/v1/accounts/{acct}/ledger?limit=1").json()
    assert j["entries"] == newest_first[:1] and j["next_before"] == newest_first[0]["id"]
    mid = newest_first[5]["id"]
    j = stack.admin("GET", f"/v1/accounts/{acct}/ledger?before={mid}&limit=500").json()
    assert j["entries"] == newest_first[6:]
    # Another account's entries never show; an account without entries lists none.
    other = _account(stack, 5)
    j = stack.admin("GET", f"/v1/accounts/{other}/ledger").json()
    assert len(j["entries"]) == 1 and j["entries"][0]["account_id"] == other
    empty = _account(stack)
    assert stack.admin("GET", f"/v1/accounts/{empty}/ledger").json() == {
        "entries": [], "next_before": None}
    for q in ["limit=0", "limit=501", "limit=-1", "limit=abc", "limit=", "limit=1.5",
              "limit=99999999999999999999", "before=0", "before=-3", "before=x", "before=",
              "limit=5&before=abc"]:
        _err(stack.admin("GET", f"/v1/accounts/{acct}/ledger?{q}"), 400, "bad_request")
    _err(stack.admin("GET", "/v1/accounts/999999999/ledger"), 404, "not_found")


# ---- auth and HTTP ---------------------------------------------------------
def test_auth(stack):
    _billing(stack)
    acct = _account(stack, 10)
    key_id = stack.admin("POST", f"/v1/accounts/{acct}/keys").json()["key_id"]
    accounts, entries, keys = (_count(stack, "accounts"), _count(stack, "ledger_entries"),
                               _count(stack, "api_keys"))
    reads = [f"/v1/accounts/{acct}", f"/v1/accounts/{acct}/ledger"]
    writes = [("POST", "/v1/accounts", {"name": "x"}),
              ("POST", f"/v1/accounts/{acct}/keys", None),
              ("DELETE", f"/v1/keys/{key_id}", None),
              ("POST", f"/v1/accounts/{acct}/topups", {"amount": 5, "reference": "auth-1"}),
              ("POST", f"/v1/accounts/{acct}/adjustments", {"amount": -5, "reason": "x"})]
    wrong = [None, "wrong-token-0123456789", ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x", "",
             FINANCE_TOKEN.upper()]
    for path in reads:
        for tok in wrong:
            _err(stack.admin("GET", path, token=tok), 401, "unauthorized")
        assert stack.admin("GET", path, token=FINANCE_TOKEN).status == 200
        assert stack.admin("GET", path, token=ADMIN_TOKEN).status == 200
        # Other schemes are not accepted.
        _err(http("GET", stack.admin_url + path, headers={"Authorization": ADMIN_TOKEN}), 401)
        _err(http("GET", stack.admin_url + path,
                  headers={"Authorization": f"Basic {ADMIN_TOKEN}"}), 401)
        _err(http("GET", stack.admin_url + path, headers={"X-Api-Key": ADMIN_TOKEN}), 401)
    for method, path, body in writes:
        for tok in wrong:
            _err(stack.admin(method, path, body, token=tok), 401, "unauthorized")
        _err(stack.admin(method, path, body, token=FINANCE_TOKEN), 403, "forbidden")
    assert (_count(stack, "accounts"), _count(stack, "ledger_entries"),
            _count(stack, "api_keys")) == (accounts, entries, keys)
    assert stack.scalar(f"select revoked_at is null from api_keys where id = {key_id}") == "t"
    assert stack.hot(acct)["credited"] == 10
    # The tokens never appear in the log.
    assert ADMIN_TOKEN not in stack.billing.output()
    assert FINANCE_TOKEN not in stack.billing.output()
    # Health needs no token.
    r = http("GET", stack.admin_url + "/healthz")
    assert r.status == 200 and r.json() == {"status": "ok"}


def test_body_limit(stack):
    _billing(stack)
    before = _count(stack, "accounts")
    head = b'{"name":"big"}'
    exact = head + b" " * (64 * 1024 - len(head))
    assert len(exact) == 65536
    r = stack.admin("POST", "/v1/accounts", exact)
    assert r.status == 201, r
    _err(stack.admin("POST", "/v1/accounts", exact + b" "), 413, "payload_too_large")
    _err(stack.admin("POST", "/v1/accounts", b"x" * (1024 * 1024)), 413, "payload_too_large")
    acct = _account(stack)
    big = json.dumps({"amount": 5, "reference": "big", "pad": "p" * 70000})
    _err(stack.admin("POST", f"/v1/accounts/{acct}/topups", big), 413, "payload_too_large")
    assert _count(stack, "accounts") == before + 2
    assert _pg_acct(stack, acct)["credited"] == 0
    # Still serving.
    assert stack.admin("GET", f"/v1/accounts/{acct}").status == 200


def test_methods_and_paths(stack):
    _billing(stack)
    acct = _account(stack)
    for method, path in [("GET", "/v1/accounts"), ("PUT", "/v1/accounts"),
                         ("DELETE", "/v1/accounts"), ("POST", f"/v1/accounts/{acct}"),
                         ("DELETE", f"/v1/accounts/{acct}"), ("PATCH", f"/v1/accounts/{acct}"),
                         ("PUT", f"/v1/accounts/{acct}/keys"),
                         ("GET", f"/v1/accounts/{acct}/topups"),
                         ("PUT", f"/v1/accounts/{acct}/adjustments"),
                         ("POST", f"/v1/accounts/{acct}/ledger"),
                         ("GET", "/v1/keys/1"), ("POST", "/v1/keys/1")]:
        _err(stack.admin(method, path, {}), 405, "method_not_allowed")
    for path in ["/", "/v1", "/v1/", "/v2/accounts", "/v1/nothing", f"/v1/accounts/{acct}/x",
                 f"/v1/accounts/{acct}/keys/1", "/v1/keys", "/v1/keys/1/x", "/healthz/x",
                 "/v1/accounts/1/ledger/extra/more/segments"]:
        _err(stack.admin("GET", path), 404, "not_found")
    _err(stack.admin("POST", "/v1/nothing", {"name": "x"}), 404, "not_found")


# ---- credit sync and repair ------------------------------------------------
def test_credit_sync_is_order_proof(stack):
    _billing(stack)
    acct = _account(stack)
    for i, amount in enumerate([100, 20, 3]):
        assert _topup(stack, acct, amount, f"seq-{i}").status == 201
    assert stack.hot(acct) == {"credited": 123, "seq": 3, "spent": 0, "held": 0}
    red = Redis(stack.redis_port)
    try:
        # Older pushes arriving late change nothing.
        assert red.credit(acct, 2, 120) == [0, 3, 0]
        assert red.credit(acct, 1, 100) == [0, 3, 0]
        assert red.credit(acct, 3, 123) == [0, 3, 0]
        assert red.acct(acct) == {"credited": 123, "seq": 3, "spent": 0, "held": 0}
        # From scratch, out of order: the newest wins whatever the order.
        red.call("DEL", acct_key(acct))
        assert red.credit(acct, 2, 120) == [1, 2, 0]
        assert red.credit(acct, 3, 123) == [1, 3, 0]
        assert red.credit(acct, 1, 100) == [0, 3, 0]
        assert red.credit(acct, 2, 120) == [0, 3, 0]
        assert red.acct(acct) == {"credited": 123, "seq": 3, "spent": 0, "held": 0}
    finally:
        red.close()
    _assert_synced(stack, acct)


def test_repair_raises_spent_redis_lost(stack):
    """Redis lost its last writes (a host crash with appendfsync everysec)
    after the settlement worker had copied the charges to Postgres: the
    repair pass raises Redis spent to Postgres', never lowers it, and only
    while the outbox is empty (with charges still on their way Postgres may
    be behind)."""
    _billing(stack)
    acct, _ = stack.new_account(100)
    red = Redis(stack.redis_port)
    try:
        # Ids of this account's own (a retry's account must not meet the
        # ledger's row of the first attempt's "lost-1").
        assert red.reserve(acct, f"lost-{acct}", 30)[0] == 1
        assert red.settle(acct, f"lost-{acct}", 30)[:2] == [1, 30]
        stack.wait_for(lambda: stack.scalar(f"select spent from accounts where id = {acct}")
                       == "30" and stack.drained(), what="settled")
        for p in stack.procs:
            if p.name == "billing" and p.alive():
                assert p.stop() == 0
        red.call("HINCRBY", acct_key(acct), "spent", -30)  # the lost write
        eid = red.call("XADD", OUTBOX, "*", "ts", 1, "c", f"other|{acct}|r|1|1|commit|200")
        assert red.credit(acct, 1, 100, 30) == [0, 1, 0]  # an entry on its way: wait
        assert red.acct(acct)["spent"] == 0
        red.call("XDEL", OUTBOX, eid)
        # A call in flight: no repair either (the loss may have brought back
        # a hold whose charge Postgres has; a late settle would count it again).
        assert red.reserve(acct, f"inflight-{acct}", 1)[0] == 1
        assert red.credit(acct, 1, 100, 30) == [0, 1, 0]
        assert red.settle(acct, f"inflight-{acct}", 0, "release", 503)[0] == 1
        red.call("DEL", OUTBOX)  # that release's entry: billing is stopped
        red.call("XGROUP", "CREATE", OUTBOX, "settle", "$", "MKSTREAM")
        assert red.credit(acct, 1, 100, 30) == [0, 1, 1]
        assert red.acct(acct)["spent"] == 30
        assert red.credit(acct, 1, 100, 10) == [0, 1, 0]  # never lowered
        assert red.acct(acct)["spent"] == 30
        red.call("HINCRBY", acct_key(acct), "spent", -30)  # lost again
    finally:
        red.close()
    stack.start_billing()  # its first repair pass puts it right
    stack.wait_for(lambda: stack.hot(acct)["spent"] == 30, timeout=10, what="spent repaired")
    # The log writer is a thread of its own: the line may follow the write.
    stack.wait_for(lambda: "Redis had lost settled charges" in stack.billing.output(), timeout=5,
                   what="the repair's log line")
    _assert_synced(stack, acct)


def test_repair_restores_redis_from_postgres(stack):
    _billing(stack)
    acct, key = stack.new_account(250)
    h = _key_hash(key)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(acct, "repair-spend", 40)[0] == 1
        assert red.settle(acct, "repair-spend", 40)[:2] == [1, 40]
    finally:
        red.close()
    stack.wait_for(lambda: _pg_acct(stack, acct)["spent"] == 40, what="charge settled")
    stack.redis("DEL", acct_key(acct), f"pg:key:{h}")
    assert stack.redis_raw("EXISTS", acct_key(acct)) == "0"
    p = stack.run_billing("repair")
    assert p.returncode == 0 and "repair" in p.stdout, p
    assert stack.hot(acct) == {"credited": 250, "seq": 1, "spent": 40, "held": 0}
    assert stack.redis_raw("GET", f"pg:key:{h}").split("|")[0] == str(acct)
    # Running it again changes nothing.
    stack.run_billing("repair")
    assert stack.hot(acct) == {"credited": 250, "seq": 1, "spent": 40, "held": 0}
    # A lost credit push (Redis behind Postgres) is caught up too.
    stack.redis("HSET", acct_key(acct), "credited", 0, "seq", 0)
    stack.run_billing("repair")
    assert stack.hot(acct) == {"credited": 250, "seq": 1, "spent": 40, "held": 0}
    # repair with Redis unreachable fails loudly.
    p = stack.run_billing("repair", env={"REDIS_URL": "redis://127.0.0.1:1/0"}, check=False)
    assert p.returncode != 0 and p.returncode != 23, p


def test_serve_repairs_at_start(stack):
    _billing(stack)
    acct, key = stack.new_account(60)
    h = _key_hash(key)
    assert stack.billing.stop() == 0
    stack.redis("DEL", acct_key(acct), f"pg:key:{h}")
    stack.start_billing()
    stack.wait_for(lambda: stack.redis_raw("GET", f"pg:key:{h}").split("|")[0] == str(acct),
                   timeout=10, what="key mirror restored")
    stack.wait_for(lambda: stack.hot(acct) == {"credited": 60, "seq": 1, "spent": 0, "held": 0},
                   timeout=10, what="account restored")
    assert stack.admin("GET", f"/v1/accounts/{acct}").json()["available"] == 60


# ---- edge cases ------------------------------------------------------------
def test_adjustment_replay_is_idempotent_while_points_are_held(stack):
    """A negative adjustment retried with its reference (the client timed out)
    must answer 200 with the entry already made, whatever is held meanwhile."""
    _billing(stack)
    acct = _account(stack, 10)
    body = {"amount": -5, "reason": "chargeback", "reference": "adj-replay"}
    r1 = stack.admin("POST", f"/v1/accounts/{acct}/adjustments", body)
    assert r1.status == 201, r1
    red = Redis(stack.redis_port)
    try:
        # A call in flight now holds 4 of the 5 points left.
        assert red.reserve(acct, "replay-hold", 4)[0] == 1
        r2 = stack.admin("POST", f"/v1/accounts/{acct}/adjustments", body)
        assert red.settle(acct, "replay-hold", 0, "release", 500)[0] == 1
    finally:
        red.close()
    assert r2.status == 200, r2
    assert r2.json() == r1.json()
    assert _pg_acct(stack, acct) == {"credited": 5, "spent": 0, "seq": 2}
    assert stack.hot(acct) == {"credited": 5, "seq": 2, "spent": 0, "held": 0}


def test_names_count_characters_not_bytes(stack):
    """Names (and references) are limited to 200 characters, as the message
    and the schema say: a 150-character name in a non-Latin script fits."""
    _billing(stack)
    name = "é" * 150  # 150 characters, 300 bytes of UTF-8
    r = stack.admin("POST", "/v1/accounts", {"name": name})
    assert r.status == 201, r
    assert r.json()["name"] == name
    assert stack.scalar(f"select length(name) from accounts where id = {r.json()['id']}") == "150"
    _err(stack.admin("POST", "/v1/accounts", {"name": "é" * 201}), 400, "bad_request")


def test_credited_ceiling(stack):
    """credited is capped at 2^53-1 (exact in the Lua scripts' doubles): a top-up
    past it is refused with 422 and changes nothing."""
    _billing(stack)
    acct = _account(stack)
    top = 2**53 - 1
    stack.psql(f"update accounts set credited = {top - 10} where id = {acct}")
    stack.run_billing("repair")  # no newer seq: Redis keeps its own copy
    _err(_topup(stack, acct, 11, "over-cap"), 422, "limit_exceeded")
    assert _pg_acct(stack, acct) == {"credited": top - 10, "spent": 0, "seq": 0}
    assert stack.scalar(f"select count(*) from ledger_entries where account_id = {acct}") == "0"
    r = _topup(stack, acct, 10, "to-cap")
    assert r.status == 201, r
    assert r.json()["credited_after"] == top
    assert stack.hot(acct)["credited"] == top
