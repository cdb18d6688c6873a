"""Abuse costs the abuser, not the gateway (issue 10 item 6), and a graceful
stop lets calls already at the upstream finish (item 1):

- the key (and the reserve) are checked before any body byte is read: an
  unknown key announcing a 900,000-byte body gets 401 at once; 100 Continue
  comes only once the key and the reserve have passed;
- a body that trickles gets 408 at its total deadline (GATEWAY_BODY_TIMEOUT_MS),
  its hold released, nothing proxied or charged;
- calls waiting for held points cost Redis work per account, not per waiter
  (measured with INFO commandstats), and are bounded per account per worker;
- a flood of client disconnects cannot flood the log;
- a reserve that finds no account in Redis is a 503, not a 402.
"""
import re
import signal
import socket
import threading
import time

import harness
from harness import http

from test_gateway import _auth, _held_zero, _sim_requests
from test_gateway_http import Reader, _at_upstream, _gateway, _get


def _setup(stack):
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
        stack.wait_epoch()
    http("POST", stack.devsim.url + "/_sim/reset")


def _connect(port, timeout=10):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _post_head(key, length, extra=b""):
    return (b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % length + extra +
            b"\r\n")


def _script_calls(stack):
    """EVALSHA + EVAL calls Redis has run (INFO commandstats)."""
    n = 0
    for line in stack.redis_raw("INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_(evalsha|eval):calls=(\d+)", line)
        if m:
            n += int(m.group(2))
    return n


def _call_at_upstream(stack, gw, path, headers, timeout=30):
    """A GET of PATH on its own thread, once it has reached the upstream:
    (the thread, a list that gets its answer)."""
    out = []
    t = threading.Thread(target=lambda: out.append(http("GET", gw.url + path, headers=headers,
                                                        timeout=timeout)))
    t.start()
    _at_upstream(stack, path)
    return t, out


def _run_threads(target, n, timeout=90):
    """TARGET(i) for i < N, each on its own thread, all joined."""
    ts = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)


# ---- the key and the reserve before the body ---------------------------------

def test_unknown_key_refused_before_the_body(stack):
    _setup(stack)
    gw = _gateway(stack, "gateway-key", {})
    # Well formed (so only a lookup can refuse it), but never issued.
    unknown = "pgk_" + "A" * 43
    try:
        before = _sim_requests(stack)
        for extra in (b"", b"Expect: 100-continue\r\n"):
            s = _connect(gw.port)
            t0 = time.time()
            s.sendall(_post_head(unknown, 900000, extra))
            rd = Reader(s)
            r = rd.response()  # not a 100 first: the body is never asked for
            assert r.status == 401 and r.json()["message"] == "unknown or revoked API key", r
            assert time.time() - t0 < 3.0, "waited for the body"
            assert r.headers["connection"] == "close", r
            assert rd.closed(), "kept open with the body unread"
            s.close()
        assert _sim_requests(stack) == before
    finally:
        assert gw.stop() == 0


def test_100_continue_only_after_key_and_reserve(stack):
    _setup(stack)
    gw = _gateway(stack, "gateway-continue", {})
    body = b'{"cmd":"on"}'
    try:
        # Short of points (price 5, 3 points): 402, no 100 Continue.
        acct, key = stack.new_account(3)
        s = _connect(gw.port)
        s.sendall(_post_head(key, len(body), b"Expect: 100-continue\r\n"))
        rd = Reader(s)
        r = rd.response()
        assert r.status == 402 and r.json()["error"] == "insufficient_points", r
        assert rd.closed()
        s.close()
        assert stack.hot(acct).get("held", 0) == 0
        # Funded: the 100 comes once the price is held, the body after it.
        acct, key = stack.new_account(100)
        s = _connect(gw.port)
        s.sendall(_post_head(key, len(body), b"Expect: 100-continue\r\n"))
        rd = Reader(s)
        r = rd.response()
        assert r.status == 100, r
        assert stack.hot(acct).get("held") == 5, stack.hot(acct)
        # Its deadline covers the body's (30 s) as well as the route timeout
        # (10 s) and HOLD_GRACE_MS (10 s): the sweeper will not take it early.
        (value,) = [v for i, v in enumerate(
            stack.redis_raw("HGETALL", f"pg:{{{acct}}}:holds").splitlines()) if i % 2]
        sec, usec = stack.redis_raw("TIME").splitlines()
        left = int(value.split("|")[-1]) - (int(sec) * 1000 + int(usec) // 1000)
        assert 45000 < left <= 50000, (value, left)
        s.sendall(body)
        r = rd.response()
        assert r.status == 202 and r.json()["body_length"] == len(body), r
        assert r.headers["x-points-charged"] == "5"
        s.close()
        # A body that is left unfinished gives the hold back, cost 0.
        s = _connect(gw.port)
        s.sendall(_post_head(key, 1000) + b"{")
        stack.wait_for(lambda: stack.hot(acct).get("held") == 5, timeout=5, what="hold taken")
        s.close()
        _held_zero(stack, acct)
        assert stack.hot(acct)["spent"] == 5
    finally:
        assert gw.stop() == 0


def test_trickled_body_gets_408_at_its_deadline(stack):
    """One byte every 0.4 s: progress does not extend the body's deadline."""
    _setup(stack)
    gw = _gateway(stack, "gateway-trickle", {"GATEWAY_BODY_TIMEOUT_MS": "1500"})
    try:
        acct, key = stack.new_account(100)
        before = _sim_requests(stack)
        s = _connect(gw.port)
        s.sendall(_post_head(key, 100))
        t0 = time.time()
        s.settimeout(0.4)
        got = b""
        while time.time() - t0 < 8 and b"\r\n\r\n" not in got:
            try:
                s.sendall(b" ")
            except OSError:
                break
            try:
                b = s.recv(65536)
                if not b:
                    break
                got += b
            except socket.timeout:
                pass
        took = time.time() - t0
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert b'"error":"request_timeout"' in got, got
        assert 1.2 <= took < 6.0, took
        s.close()
        _held_zero(stack, acct)
        assert stack.hot(acct)["spent"] == 0
        assert _sim_requests(stack) == before
    finally:
        assert gw.stop() == 0


def test_body_completed_past_its_deadline_is_408(stack):
    """The body deadline is exact, not "at the next tick" (which may come up
    to a quarter of the deadline, at most 1 s, later): a body that completes
    300 ms past it is refused 408, not proxied. Four calls, 250 ms apart,
    so that at least two of them complete between two ticks."""
    _setup(stack)
    gw = _gateway(stack, "gateway-late", {"GATEWAY_BODY_TIMEOUT_MS": "4000",
                                          "GATEWAY_THREADS": "1"})
    try:
        acct, key = stack.new_account(100)
        before = _sim_requests(stack)
        res = [None] * 4

        def late(i):
            s = _connect(gw.port, timeout=20)
            s.sendall(_post_head(key, 2, b"Expect: 100-continue\r\n"))
            rd = Reader(s)
            r = rd.response()
            assert r.status == 100, r
            t0 = time.time()
            time.sleep(4.3)
            s.sendall(b"{}")
            res[i] = (rd.response(), time.time() - t0)
            s.close()

        ts = []
        for i in range(4):
            ts.append(threading.Thread(target=late, args=(i,)))
            ts[-1].start()
            time.sleep(0.25)
        for t in ts:
            t.join(30)
        assert all(r and r[0].status == 408 for r in res), [(r[0].status, r[1]) for r in res if r]
        assert all(r[0].json()["error"] == "request_timeout" for r in res)
        _held_zero(stack, acct)
        assert stack.hot(acct)["spent"] == 0
        assert _sim_requests(stack) == before
    finally:
        assert gw.stop() == 0


# ---- waiting for held points ---------------------------------------------------

def _hold_one_point(stack, gw, key, delay_ms):
    """A call that holds the account's only point for DELAY_MS at the
    upstream, then fails (503): the point goes back for the waiters. Returns
    once it is at the upstream: (its thread, a list that gets its answer)."""
    h = dict(_auth(key), **{"X-Sim-Delay-Ms": str(delay_ms), "X-Sim-Status": "503"})
    return _call_at_upstream(stack, gw, "/v1/devices/holder", h, timeout=60)


def test_waiters_cost_redis_work_per_account_not_per_waiter(stack):
    """300 calls wait for the 1-point account's held point for ~4 s. The old
    rule (each waiter polling its own reserve every <= 50 ms) cost Redis
    about 20 script calls per waiter per second; now one reserve per account
    per worker is in flight at a time."""
    _setup(stack)
    threads_n = 5
    gw = _gateway(stack, "gateway-waiters", {"GATEWAY_THREADS": str(threads_n),
                                             "HOLD_WAIT_MS": "30000"})
    try:
        acct, key = stack.new_account(1)
        t, held = _hold_one_point(stack, gw, key, 4000)
        calls0 = _script_calls(stack)
        t0 = time.time()
        res = [None] * 300

        def waiter(i):
            try:
                res[i] = http("GET", gw.url + f"/v1/devices/w{i}", headers=_auth(key), timeout=60)
            except OSError as e:
                res[i] = e

        _run_threads(waiter, 300)
        t.join(30)
        took = time.time() - t0
        calls = _script_calls(stack) - calls0
        assert held[0].status == 503, held
        codes = [r.status if isinstance(r, harness.Response) else repr(r) for r in res]
        busy = [r for r in res if isinstance(r, harness.Response) and r.status == 503]
        assert all(r.json()["error"] == "too_many_waiting" for r in busy), busy[:3]
        waited = len(res) - len(busy)
        assert codes.count(200) == 1, {c: codes.count(c) for c in set(codes)}
        assert codes.count(402) == waited - 1, {c: codes.count(c) for c in set(codes)}
        assert waited >= 200, waited  # most of them did wait (64 per worker at most)
        assert took >= 3.0, took
        per_call = calls / waited
        print(f"    {waited} waiters for {took:.1f}s: {calls} script calls, "
              f"{per_call:.2f} per waiting call")
        # One reserve each to find out they are short (the first per worker),
        # a shared poll per worker every <= 50 ms, and the final answers.
        # The old rule: about 20 per waiter per second, i.e. ~80 here.
        assert per_call < 3.0, (calls, waited, per_call)
        h = stack.hot(acct)
        assert h["spent"] == 1 and h["held"] == 0, h
    finally:
        assert gw.stop() == 0


def test_waiters_per_account_per_worker_are_bounded(stack):
    _setup(stack)
    gw = _gateway(stack, "gateway-waitbound", {"GATEWAY_THREADS": "1", "HOLD_WAIT_MS": "30000",
                                               "GATEWAY_MAX_WAITERS": "64"})
    try:
        acct, key = stack.new_account(1)
        t, held = _hold_one_point(stack, gw, key, 3000)
        t_holder = time.time()
        res = [None] * 100
        done = [None] * 100
        t0 = time.time()

        def waiter(i):
            res[i] = http("GET", gw.url + f"/v1/devices/w{i}", headers=_auth(key), timeout=60)
            done[i] = time.time() - t0

        _run_threads(waiter, 100)
        t.join(30)
        busy = [i for i in range(100) if res[i].status == 503]
        assert len(busy) == 36, [r.status for r in res]
        assert all(res[i].json()["error"] == "too_many_waiting" for i in busy)
        # At once: before the holder's point came back (3 s after it reached the upstream).
        first_served = min(done[i] for i in range(100) if res[i].status != 503)
        assert all(done[i] < first_served for i in busy), ([done[i] for i in busy], first_served)
        assert first_served + t0 - t_holder >= 2.5, first_served
        codes = [r.status for r in res]
        assert codes.count(200) == 1 and codes.count(402) == 63, codes
        h = stack.hot(acct)
        assert h["spent"] == 1 and h["held"] == 0, h
    finally:
        assert gw.stop() == 0


def test_cheaper_waiter_is_not_stuck_behind_a_pricier_one(stack):
    """7 points: a 5-point call holds 5 for 6 s, a second 5-point call waits
    for them (2 available). A 1-point call then needs no held point at all:
    it is served at once, not queued behind the pricier waiter until the
    holder ends (nor refused 402 at its deadline with 2 points available)."""
    _setup(stack)
    gw = _gateway(stack, "gateway-mixed", {"GATEWAY_THREADS": "1", "HOLD_WAIT_MS": "30000"})
    try:
        acct, key = stack.new_account(7)
        cmd = dict(_auth(key), **{"Content-Type": "application/json"})
        held, waiter = [], []
        t = threading.Thread(target=lambda: held.append(http(
            "POST", gw.url + "/v1/devices/holder/commands", body=b"{}", timeout=60,
            headers=dict(cmd, **{"X-Sim-Delay-Ms": "6000", "X-Sim-Status": "503"}))))
        t.start()
        _at_upstream(stack, "/v1/devices/holder/commands")
        assert stack.hot(acct)["held"] == 5
        tw = threading.Thread(target=lambda: waiter.append(http(
            "POST", gw.url + "/v1/devices/waiter/commands", body=b"{}", headers=cmd,
            timeout=60)))
        tw.start()
        time.sleep(1.0)  # the 5-point call is short (2 available) and waits
        assert not waiter, waiter
        r = http("GET", gw.url + "/v1/devices/cheap", headers=_auth(key), timeout=60)
        assert r.status == 200, r
        assert not held, "the 1-point call waited for the holder to end"
        assert not waiter, waiter
        assert r.headers["x-points-charged"] == "1"
        t.join(30)
        tw.join(30)
        assert held[0].status == 503, held
        # The holder's 5 came back: the waiter got them.
        assert waiter[0].status == 202 and waiter[0].headers["x-points-charged"] == "5", waiter
        _held_zero(stack, acct)
        assert stack.hot(acct)["spent"] == 6
    finally:
        assert gw.stop() == 0


# ---- the log under a flood of disconnects --------------------------------------

def test_disconnect_flood_does_not_flood_the_log(stack):
    """3,000 clients send a call and leave at once, while the only upstream
    connection is busy (their calls never reach it): each is dropped at cost
    0, and the log gets at most 10 such lines a second (then a summary)."""
    _setup(stack)
    gw = _gateway(stack, "gateway-flood", {"GATEWAY_THREADS": "1",
                                           "UPSTREAM_MAX_CONNECTIONS": "1"})
    try:
        acct, key = stack.new_account(100000)
        t, held = _hold_one_point(stack, gw, key, 6000)
        t0 = time.time()
        req = _get("/v1/devices/flood", key)

        def flood(n):
            for _ in range(n):
                try:
                    s = _connect(gw.port, timeout=5)
                    s.sendall(req)
                    s.close()
                except OSError:
                    pass

        fs = [threading.Thread(target=flood, args=(375,)) for _ in range(8)]
        for f in fs:
            f.start()
        for f in fs:
            f.join(120)
        # The loop was not stalled: a status call answers at once.
        r = http("GET", gw.url + "/_billing/balance", headers=_auth(key), timeout=5)
        assert r.status == 200, r
        took = time.time() - t0
        t.join(30)
        _held_zero(stack, acct)
        assert stack.hot(acct)["spent"] == 0
        out = gw.output()
        gone = out.count("client went away")
        suppressed = len(re.findall(r"similar log lines suppressed", out))
        print(f"    3000 disconnects in {took:.1f}s: {gone} lines, {suppressed} summaries")
        bound = 10 * (int(took) + 4)  # 10 a second, over the seconds the flood spanned
        assert 0 < gone <= bound, (gone, bound)
        assert suppressed >= 1
    finally:
        assert gw.stop() == 0


# ---- graceful stop: a call at the upstream finishes and is charged -------------

def _sigterm_past_grace(stack, lease_calls):
    _setup(stack)
    routes = {"charge_on": ["2xx"], "routes": [
        {"id": "device.long", "method": "GET", "path": "/v1/devices/*", "price": 1,
         "timeout_ms": 8000}]}
    gw = _gateway(stack, "gateway-term", {"GATEWAY_LEASE_CALLS": str(lease_calls),
                                          "GATEWAY_THREADS": "1", "UPSTREAM_TIMEOUT_MS": "200"},
                  routes)
    acct, key = stack.new_account(1000)
    spent = 0
    if lease_calls:
        # A first call starts the account's lease; the long call is promised from it.
        assert http("GET", gw.url + "/v1/devices/warm", headers=_auth(key)).status == 200
        spent += 1
        stack.wait_for(lambda: stack.leases(), timeout=5, what="a lease")
    t, out = _call_at_upstream(stack, gw, "/v1/devices/long",
                               dict(_auth(key), **{"X-Sim-Delay-Ms": "4500"}))
    gw.signal(signal.SIGTERM)
    t.join(20)
    assert out and out[0].status == 200 and out[0].headers["x-points-charged"] == "1", out
    spent += 1
    assert gw.p.wait(20) == 0
    h = stack.hot(acct)
    assert h["spent"] == spent and h["held"] == 0, h
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert stack.psql(f"select amount, outcome from charges where account_id = {acct}") == \
        [["1", "commit"]] * spent


def test_sigterm_past_grace_lets_written_calls_finish(stack):
    """The drain's grace (UPSTREAM_TIMEOUT_MS + 2 s) passes while a call with
    a longer route timeout is at the upstream: it is not cancelled, its 200
    reaches the client, and it is charged."""
    _sigterm_past_grace(stack, 0)


def test_sigterm_past_grace_lets_written_leased_calls_finish(stack):
    """The same for a call whose price a lease promised."""
    _sigterm_past_grace(stack, 2)


def test_sigterm_past_grace_answers_waiters_shutting_down(stack):
    """Past the drain's grace, calls that have not reached the upstream (one
    waiting for the held point, one whose body is still to come) get 503
    saying the gateway is shutting down, and the log does not claim that
    their clients went away; the call at the upstream finishes and is
    charged."""
    _setup(stack)
    routes = {"charge_on": ["2xx"], "routes": [
        {"id": "device.long", "method": "GET", "path": "/v1/devices/*", "price": 1,
         "timeout_ms": 8000},
        {"id": "device.command", "method": "POST", "path": "/v1/devices/*/commands", "price": 1,
         "timeout_ms": 8000}]}
    gw = _gateway(stack, "gateway-termwait", {"GATEWAY_THREADS": "1", "UPSTREAM_TIMEOUT_MS": "200",
                                              "HOLD_WAIT_MS": "30000"}, routes)
    port = gw.port
    acct, key = stack.new_account(2)
    t, out = _call_at_upstream(stack, gw, "/v1/devices/long",
                               dict(_auth(key), **{"X-Sim-Delay-Ms": "5000"}))
    # The second point is held by a call whose body is still to come.
    early = _connect(port)
    early.sendall(_post_head(key, 10))
    stack.wait_for(lambda: stack.hot(acct).get("held") == 2, timeout=5, what="both points held")
    waiter = _connect(port)
    waiter.sendall(_get("/v1/devices/waiter", key))
    time.sleep(0.5)  # short of points while both are held: it waits
    gw.signal(signal.SIGTERM)
    for s, what in ((waiter, "waiter"), (early, "early")):
        s.settimeout(20)
        r = Reader(s).response()
        assert r.status == 503 and r.json() == {"error": "cancelled", "message": "shutting down"}, \
            (what, r)
        s.close()
    t.join(20)
    assert out and out[0].status == 200 and out[0].headers["x-points-charged"] == "1", out
    assert gw.p.wait(20) == 0
    assert "client went away" not in gw.output()
    h = stack.hot(acct)
    assert h["spent"] == 1 and h["held"] == 0, h


# ---- reply codes (hotclient.h): what Redis cannot tell is a 503 ------------------

def test_account_missing_from_redis_is_503_not_402(stack):
    """Billing creates every account's hash with the account, so a reserve
    that finds none means Redis lost its data: 503 billing_unavailable,
    never a 402 the caller did not earn."""
    _setup(stack)
    gw = _gateway(stack, "gateway-nodata", {})
    try:
        acct, key = stack.new_account(10)
        assert http("GET", gw.url + "/v1/devices/d1", headers=_auth(key)).status == 200
        before = _sim_requests(stack)
        stack.redis_raw("DEL", f"pg:{{{acct}}}:acct")
        r = http("GET", gw.url + "/v1/devices/d2", headers=_auth(key))
        assert r.status == 503, r
        assert r.json() == {"error": "billing_unavailable",
                            "message": "billing data is being restored, try again"}, r
        assert _sim_requests(stack) == before
        # Nor a balance of 0 for what Redis lost.
        b = http("GET", gw.url + "/_billing/balance", headers=_auth(key))
        assert b.status == 503 and b.json()["error"] == "billing_unavailable", b
    finally:
        assert gw.stop() == 0
