"""Redis losing its data (issue 10, item 4): a restart without its AOF,
FLUSHALL, a failover to an empty replica. Billing writes pg:epoch only after a
complete rebuild from Postgres; `billing serve` checks for it every 250 ms
and rebuilds at once when it is gone (billing/creditsync.c). While the data
is missing the gateway answers 503 billing_unavailable, never 401 or 402 for
what it cannot find (gateway side: gateway/hotclient.c, gateway/request.c).

The first tests need billing only. test_flushall_under_traffic needs the
gateway's side too (503 for a missing key while pg:epoch is absent, and for
a missing account hash).
"""
import random
import subprocess
import threading
import time

from harness import http
from luahelp import OUTBOX, Redis, acct_key, holds_key

NO_PERIODIC = {"CREDIT_SYNC_INTERVAL_MS": "600000"}  # only the loss detector can help


def _key_hash(api_key):
    import hashlib
    from harness import PEPPER
    pepper = hashlib.blake2b(PEPPER.encode(), digest_size=32).digest()
    return hashlib.blake2b(api_key.encode(), digest_size=32, key=pepper).hexdigest()


def _pg_accounts(stack):
    return {int(r[0]): {"credited": int(r[1]), "seq": int(r[2]), "spent": int(r[3])}
            for r in stack.psql("select id, credited, credit_seq, spent from accounts")}


def _pg_keys(stack):
    return {r[0]: (int(r[1]), r[2] == "t")
            for r in stack.psql("select key_hash, account_id, revoked_at is not null "
                                "from api_keys")}


def _assert_redis_complete(stack):
    """Every account hash and key mirror as Postgres says."""
    for acct, pg in _pg_accounts(stack).items():
        hot = stack.hot(acct)
        assert {k: hot.get(k) for k in ("credited", "seq", "spent")} == pg, (acct, hot, pg)
    for h, (acct, revoked) in _pg_keys(stack).items():
        v = stack.redis_raw("GET", f"pg:key:{h}")
        assert (v == "-1") if revoked else (v.split("|")[0] == str(acct)), (h, v)


def _epoch(stack):
    return stack.redis_raw("GET", "pg:epoch")


def _wait_epoch(stack, timeout):
    t0 = time.time()
    stack.wait_for(lambda: _epoch(stack), timeout=timeout, what="pg:epoch rewritten")
    return time.time() - t0


def test_flushall_is_detected_and_rebuilt_at_once(stack):
    stack.start_billing(NO_PERIODIC)
    accts = [stack.new_account(1000 * (i + 1), f"loss{i}") for i in range(5)]
    zero, _ = stack.new_account(0, "never-credited")
    revoked = stack.admin("POST", f"/v1/accounts/{accts[0][0]}/keys").json()
    assert stack.admin("DELETE", f"/v1/keys/{revoked['key_id']}").status == 204
    red = Redis(stack.redis_port)
    try:  # a settled charge, so that spent comes back from Postgres too
        a = accts[1][0]
        assert red.reserve(a, "before-loss", 70)[0] == 1
        assert red.settle(a, "before-loss", 70)[:2] == [1, 70]
    finally:
        red.close()
    stack.wait_for(lambda: _pg_accounts(stack)[accts[1][0]]["spent"] == 70 and stack.drained(),
                   what="charge settled")
    first = _epoch(stack)
    assert first, "the first pass writes pg:epoch"
    # An account hash exists from creation on, credited or not.
    assert stack.hot(zero) == {"credited": 0, "seq": 0, "spent": 0, "held": 0}
    _assert_redis_complete(stack)

    stack.redis("FLUSHALL")
    took = _wait_epoch(stack, timeout=10)
    print(f"pg:epoch back {took * 1000:.0f} ms after FLUSHALL")
    assert took < 3.0, f"rebuild took {took:.1f} s"  # ~0.3 s here; generous for loaded hosts
    assert _epoch(stack) != first
    _assert_redis_complete(stack)
    assert stack.hot(zero) == {"credited": 0, "seq": 0, "spent": 0, "held": 0}
    assert stack.redis_raw("GET", f"pg:key:{_key_hash(revoked['api_key'])}") == "-1"
    assert "pg:epoch is missing" in stack.billing.output()
    # Settlement recreated its consumer group: a new charge reaches Postgres.
    red = Redis(stack.redis_port)
    try:
        a = accts[1][0]
        assert red.reserve(a, "after-loss", 30)[0] == 1
        assert red.settle(a, "after-loss", 30)[:2] == [1, 30]
    finally:
        red.close()
    stack.wait_for(lambda: _pg_accounts(stack)[accts[1][0]]["spent"] == 100 and stack.drained(),
                   timeout=20, what="charge after the loss settled")
    assert stack.hot(accts[1][0])["spent"] == 100
    # A second loss, by a Redis restart without its data: the same.
    stack.redis("FLUSHALL")
    _wait_epoch(stack, timeout=10)
    _assert_redis_complete(stack)


def test_a_pass_that_spans_a_loss_writes_no_epoch(stack):
    """passend.lua: the epoch is written only when the pass's marker, set
    before its first push, survived to its end; keypush.lua writes nothing
    for a pass whose marker is gone. (No billing serve meanwhile: its
    detector would rebuild under our feet.)"""
    if stack.billing is not None and stack.billing.alive():
        assert stack.billing.stop() == 0
    red = Redis(stack.redis_port)
    try:
        red.call("DEL", "pg:epoch")
        red.call("SET", "pg:rebuild:t1", "1")
        red.call("FLUSHALL")
        assert red.call("EVALSHA", red.sha("keypush"), 2, "pg:key:ab", "pg:rebuild:t1",
                        "7|1|1|0|") == 2
        assert red.call("EXISTS", "pg:key:ab") == 0
        assert red.call("EVALSHA", red.sha("passend"), 2, "pg:rebuild:t1", "pg:epoch", "e1") == 0
        assert red.call("EXISTS", "pg:epoch") == 0
        red.call("SET", "pg:rebuild:t2", "1")
        assert red.call("EVALSHA", red.sha("passend"), 2, "pg:rebuild:t2", "pg:epoch", "e2") == 2
        assert red.call("GET", "pg:epoch") == "e2"
        assert red.call("EXISTS", "pg:rebuild:t2") == 0
        red.call("SET", "pg:rebuild:t3", "1")
        assert red.call("EVALSHA", red.sha("passend"), 2, "pg:rebuild:t3", "pg:epoch", "e3") == 1
        assert red.call("GET", "pg:epoch") == "e2"  # kept: no loss since
    finally:
        red.close()
    # And `billing repair` writes it after a loss too.
    stack.redis("FLUSHALL")
    stack.run_billing("repair")
    assert _epoch(stack)


def test_account_hash_lost_alone_is_recreated_with_its_holds(stack):
    """No epoch change (only one account's hash is gone, its holds hash
    survives): the next repair pass recreates the hash with held from the
    holds (credit.lua), never 0, and schedules its catch-up passes."""
    if stack.billing is None or not stack.billing.alive():
        stack.start_billing({"CREDIT_SYNC_INTERVAL_MS": "1000"})
    acct, _ = stack.new_account(100, "alone")
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(acct, f"alone-hold-{acct}", 60)[0] == 1
        red.call("DEL", acct_key(acct))
        stack.wait_for(lambda: stack.hot(acct).get("credited") == 100, timeout=20,
                       what="hash recreated by a pass")
        assert stack.hot(acct)["held"] == 60
        assert red.reserve(acct, f"too-much-{acct}", 41)[0] == 0  # 40 available, not 100
        assert red.settle(acct, f"alone-hold-{acct}", 60)[:2] == [1, 60]
    finally:
        red.close()
    # Logged at the end of the pass, after its key phase: may trail the hash.
    stack.wait_for(lambda: "were behind in redis" in stack.billing.output(), timeout=20,
                   what="the pass's report")
    stack.wait_for(lambda: _pg_accounts(stack)[acct]["spent"] == 60 and stack.drained(),
                   what="charge settled")
    hot = stack.hot(acct)
    assert hot["held"] == 0 and hot["spent"] == 60, hot


def test_negative_adjustment_waits_for_a_pass_in_its_account_phase(stack):
    """The account phase of a pass and a negative adjustment's guard-to-push
    window exclude each other (a Postgres advisory lock, control.h), so a
    hash a rebuild creates never misses a debit whose guard the loss took.
    Here a session holds the pass's lock: the debit waits for it."""
    if stack.billing is None or not stack.billing.alive():
        stack.start_billing(NO_PERIODIC)
    acct, _ = stack.new_account(100, "adj-lock")
    holder = subprocess.Popen(
        ["psql", stack.env["DATABASE_URL"], "-At", "-c",
         "SELECT pg_advisory_lock(x'706770617373'::bigint), pg_sleep(1.5)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(stack.env, PGAPPNAME="adj-lock-holder"))
    try:
        # The holder's own lock (billing's threads take advisory locks of
        # their own, e.g. the archive pass's, which must not count here).
        stack.wait_for(lambda: stack.scalar(
            "select count(*) from pg_locks l join pg_stat_activity a using (pid) "
            "where l.locktype = 'advisory' and l.granted "
            "and a.application_name = 'adj-lock-holder'") == "1",
            timeout=10, what="the pass's lock held")
        t0 = time.time()
        r = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                        {"amount": -10, "reason": "lock"})
        waited = time.time() - t0
    finally:
        holder.wait(10)
    assert r.status == 201, r
    assert waited >= 0.5, f"adjustment did not wait for the pass's lock ({waited:.2f} s)"
    # And the debit landed in Redis once the lock was free.
    assert stack.hot(acct)["credited"] == 90


# ---- end to end: needs the gateway's side (h1, h4) --------------------------
THREADS = 3
ROUTES = {
    "charge_on": ["2xx"],
    "routes": [{"id": "device.read", "method": "GET", "path": "/v1/devices/*", "price": 1}],
}


def test_flushall_under_traffic(stack):
    """FLUSHALL while three clients call with valid keys of four funded
    accounts: every answer is 200 or 503 (never 401/402), calls are served
    again within seconds, and every call started after the loss is charged
    in Postgres exactly as its answer said."""
    if stack.billing is not None and stack.billing.alive():
        assert stack.billing.stop() == 0  # no periodic pass: only the detector helps
    stack.start_billing(NO_PERIODIC)
    stack.start_devsim()
    stack.start_gateway(ROUTES)
    accts = [stack.new_account(10**6, f"traffic{i}") for i in range(4)]
    for a, key in accts:
        stack.wait_for(lambda: stack.redis_raw("GET", f"pg:key:{_key_hash(key)}").split("|")[0] == str(a),
                       what="key mirrored")
    answers, stop = [], threading.Event()

    def client(i):
        rnd = random.Random(i)
        while not stop.is_set():
            acct, key = rnd.choice(accts)
            t0 = time.time()
            try:
                r = http("GET", stack.gateway.url + f"/v1/devices/d{i}",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30)
                answers.append((t0, time.time(), r.status, r.headers.get("x-request-id"),
                                r.headers.get("x-points-charged"), acct))
            except OSError as e:
                answers.append((t0, time.time(), repr(e), None, None, acct))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        stack.redis("FLUSHALL")
        t_flush = time.time()
        time.sleep(8.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    statuses = {}
    for a in answers:
        statuses[a[2]] = statuses.get(a[2], 0) + 1
    print("answers:", statuses)
    assert set(statuses) <= {200, 503}, statuses
    after = [a for a in answers if a[0] > t_flush]
    served = [a for a in after if a[2] == 200]
    assert served, "nothing served after the loss"
    back = min(a[0] for a in served) - t_flush
    last_refusal = max((a[1] for a in after if a[2] != 200), default=t_flush) - t_flush
    print(f"served again {back * 1000:.0f} ms after FLUSHALL; last 503 at {last_refusal:.2f} s")
    assert back < 5.0 and last_refusal < 5.0, (back, last_refusal)
    # Conservation for every call started after the loss, once all settled
    # and the catch-up passes ran (spent equal in both stores).
    stack.wait_for(stack.drained, timeout=60, what="outbox drained")
    rows = {r[0]: int(r[1]) for r in stack.psql("select reservation_id, amount from charges")}
    wrong = [(a[3], a[4], rows.get(a[3])) for a in served
             if int(a[4] or 0) != rows.get(a[3], 0)]
    assert not wrong, f"{len(wrong)} answers charged otherwise in postgres: {wrong[:5]}"
    pg = _pg_accounts(stack)

    def equal():
        return all(stack.hot(a)["spent"] == pg[a]["spent"] for a, _ in accts)

    stack.wait_for(equal, timeout=30, what="redis spent == postgres spent")
    for a, _ in accts:
        hot = stack.hot(a)
        assert hot["held"] == 0 and pg[a]["spent"] <= pg[a]["credited"], (hot, pg[a])


PAUSE_MS = 6000  # settlement's test-only pause between its read and its commit


def _pending(stack):
    out = stack.redis_raw("XPENDING", OUTBOX, "settle").splitlines()
    return int(out[0]) if out else 0


def test_batch_read_before_the_loss_is_in_the_rebuilt_hash(stack):
    """A settlement batch read from the outbox before a FLUSHALL and
    committed to Postgres after it: the rebuild reads Postgres only after
    that commit (settlement holds the pass lock shared from its read to its
    commit; billing/settlement.c), so the rebuilt hash counts the batch the
    moment pg:epoch is back, and the account can spend exactly what it has
    left, not a point more. SETTLE_TEST_PAUSE_MS (tests only) holds every
    batch between read and commit, making the window deterministic; the
    catch-up pass 2 s after a rebuild comes before the commit, so without
    the lock Redis spent stays below Postgres' for the next 8 s."""
    if stack.billing is not None and stack.billing.alive():
        assert stack.billing.stop() == 0
    stack.start_billing({**NO_PERIODIC, "SETTLE_TEST_PAUSE_MS": str(PAUSE_MS)})
    red = Redis(stack.redis_port)
    try:
        acct, _ = stack.new_account(1000, "late-batch")
        stack.wait_for(lambda: _epoch(stack), timeout=20, what="first pass")
        assert red.reserve(acct, f"late-{acct}", 300)[0] == 1
        assert red.settle(acct, f"late-{acct}", 300)[:2] == [1, 300]
        # Read by settlement (pending for its consumer), not committed yet.
        stack.wait_for(lambda: _pending(stack) == 1, timeout=20, what="batch read")
        assert _pg_accounts(stack)[acct]["spent"] == 0
        t0 = time.time()
        stack.redis("FLUSHALL")
        stack.wait_for(lambda: _epoch(stack), timeout=PAUSE_MS / 1000 + 30,
                       what="pg:epoch rewritten")
        print(f"pg:epoch back {time.time() - t0:.1f} s after FLUSHALL")
        stack.wait_for(lambda: _pg_accounts(stack)[acct]["spent"] == 300, timeout=30,
                       what="late batch committed")
        hot = stack.hot(acct)
        assert hot["spent"] == 300 and hot["held"] == 0, hot
        # Exactly 700 left: 700 can be held, one point more cannot.
        assert red.reserve(acct, f"rest-{acct}", 700)[0] == 1
        over = red.reserve(acct, f"one-more-{acct}", 1)
        if over[0] == 1:
            red.settle(acct, f"one-more-{acct}", 0, outcome="release")
        assert over[0] == 0, f"served past the balance: {over}"
        # Post-loss charges: spent in both stores ends the same once settled
        # (a catch-up push meanwhile never lowers Redis spent).
        assert red.settle(acct, f"rest-{acct}", 700)[:2] == [1, 700]
        stack.wait_for(lambda: _pg_accounts(stack)[acct]["spent"] == 1000 and stack.drained(),
                       timeout=60, what="post-loss charge settled")
        assert stack.hot(acct)["spent"] == 1000
    finally:
        red.close()
        assert stack.billing.stop() == 0  # no test-only pause for the next tests
