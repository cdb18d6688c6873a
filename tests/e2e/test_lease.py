"""Point leases (gateway/lease.c, billing/lease.lua) end to end, on real Redis,
Postgres, billing and devsim.

A gateway worker that sees an account with plenty of points takes one hold
of a block of them (a lease, field L<32 hex> of pg:{A}:holds, value
"amount|~lease|seq|free|deadline|soft") and serves that account's calls from it,
settling their records with one lease.lua op per pass. What must not change
with leases: every call gets the same answer and headers as with per-call
holds, Postgres gets one charges row per call, the balances shown to people
count a lease's unpromised points as available, nobody is refused while a
lease sits on points that would cover them, a dead gateway's lease is
expired by the sweeper at no cost, and the stores agree at the end.

Each test starts its own gateway(s) with the lease settings it needs
(GATEWAY_LEASE_CALLS small so that accounts of a few dozen points get one).
"""
import concurrent.futures
import http.client as http_client
import os
import re
import signal
import socket
import threading
import time

import harness
from harness import http

from test_crash import _conserved
from test_gateway import ROUTES, _auth, _sim_requests


def _one_write(port, method, path, body, headers):
    """One call whose head and body leave in a single write (http.client
    sends them in two, and a body that has not arrived with its head is not
    served from a lease)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    req = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{head}\r\n"
           ).encode() + body
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(req)
        r = http_client.HTTPResponse(s)
        r.begin()
        data = r.read()
        return harness.Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        s.close()

LEASE_VALUE = re.compile(r"^(\d+)\|~lease\|(\d+)\|(\d+)\|(\d+)\|(\d+)$")
LEASE_FIELD = re.compile(r"^L[0-9a-f]{32}$")


# ---- helpers -----------------------------------------------------------------

def _base(stack):
    """devsim and billing for the module (started on first use); counters reset.
    Gateways an earlier test left running (it failed before stopping them) are
    stopped first: a leftover could keep working on Redis under this test."""
    for p in getattr(stack, "lease_gateways", []):
        if p.alive():
            p.stop()
    stack.lease_gateways = []
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    http("POST", stack.devsim.url + "/_sim/reset")


def _gateway(stack, env, routes=None, name="gateway-lease"):
    """A gateway of this test's own, with ENV on top of the stack's."""
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(routes or ROUTES)}
    e.update(env)
    p = stack.spawn(name, [stack.bin("gateway")], e, port)
    stack.lease_gateways.append(p)
    return p


def _account(stack, points):
    """A new account whose credit has reached Redis."""
    acct, key = stack.new_account(points)
    stack.wait_for(lambda: stack.hot(acct).get("credited") == points, timeout=15,
                   what="credit in redis")
    return acct, key


def _holds(stack, acct):
    out = stack.redis_raw("HGETALL", f"pg:{{{acct}}}:holds").splitlines()
    return {out[i]: out[i + 1] for i in range(0, len(out) - 1, 2)}


def _leases(stack, acct):
    """The account's leases in Redis: {field: (amount, seq, free, deadline, soft)}.
    A field of the lease kind that does not parse fails the test."""
    out = {}
    for field, value in _holds(stack, acct).items():
        if "|~lease|" not in value:
            continue
        m = LEASE_VALUE.match(value)
        assert m and LEASE_FIELD.match(field), (field, value)
        out[field] = tuple(int(x) for x in m.groups())
    return out


def _real_available(stack, acct):
    """credited - spent - held: what a per-call reserve can take (lease points
    count as held here)."""
    h = stack.hot(acct)
    return h["credited"] - h["spent"] - h.get("held", 0)


def _shown_available(h):
    """What people are shown: a lease's unpromised points are available."""
    return h["credited"] - h["spent"] - h.get("held", 0) + h.get("leasefree", 0)


def _no_leases_left(stack, acct):
    h = stack.hot(acct)
    return not _leases(stack, acct) and h.get("held", 0) == 0 and h.get("leasefree", 0) == 0


def _log(proc, n=4000):
    return proc.output()[-n:]


def _charges(stack, acct):
    """{reservation_id: (amount, outcome, route, status, hold)} of the account."""
    rows = stack.psql("select reservation_id, amount, outcome, route, status, hold "
                      f"from charges where account_id = {acct}")
    return {r[0]: (int(r[1]), r[2], r[3], int(r[4]), int(r[5])) for r in rows}


def _calls(url, key, n, prefix="d"):
    """N sequential 1-point calls through URL, each answered 200: the answers."""
    out = []
    for i in range(n):
        r = http("GET", url + f"/v1/devices/{prefix}{i}", headers=_auth(key))
        assert r.status == 200, r
        out.append(r)
    return out


class _LeaseWatch:
    """Samples the account's holds hash while load runs: the most leases seen
    at once, and any lease value that did not parse."""

    def __init__(self, stack, acct):
        self.stack, self.acct = stack, acct
        self.max_leases = 0
        self.samples = 0
        self.bad = []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop_ev.is_set():
            try:
                n = len(_leases(self.stack, self.acct))
            except AssertionError as e:
                self.bad.append(str(e))
                n = 0
            self.max_leases = max(self.max_leases, n)
            self.samples += 1
            time.sleep(0.02)

    def stop(self):
        self.stop_ev.set()
        self.t.join(5)


# ---- 1. a lease is used, counted as available, and goes back when idle --------

def test_lease_serves_calls_and_goes_back_when_idle(stack):
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "16", "GATEWAY_LEASE_IDLE_MS": "1000",
                          "GATEWAY_THREADS": "1"})
    acct, key = _account(stack, 10000)
    answers = _calls(gw.url, key, 12)
    assert [a.headers["x-points-charged"] for a in answers] == ["1"] * 12
    assert [int(a.headers["x-points-remaining"]) for a in answers] == \
        list(range(9999, 9987, -1)), [a.headers["x-points-remaining"] for a in answers]

    leases = _leases(stack, acct)
    assert len(leases) == 1, (_holds(stack, acct), _log(gw))
    lid, (amount, seq, free, _deadline, _soft) = next(iter(leases.items()))
    assert seq > 2, leases  # created, then ops carrying the calls' records
    assert 0 < amount <= 16 + 16, leases
    h = stack.hot(acct)
    # Nothing in flight: the lease is the only hold, all of it unpromised.
    assert set(_holds(stack, acct)) == {lid}, _holds(stack, acct)
    assert h["spent"] == 12 and h["held"] == amount and h["leasefree"] == amount == free, (h, leases)
    assert _shown_available(h) == 10000 - 12

    # A call in flight is served from the lease: no per-call hold appears.
    out = []
    t = threading.Thread(target=lambda: out.append(http(
        "GET", gw.url + "/v1/devices/slow", headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "700"}))))
    t.start()
    stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/stats").json()["in_flight"] == 1,
                   timeout=5, what="the slow call at the upstream")
    time.sleep(0.3)  # a lease probe (every 250 ms) has run meanwhile
    hk = _holds(stack, acct)
    assert list(hk) == [lid], ("a per-call hold was taken although the lease has room", hk)
    t.join(10)
    assert out and out[0].status == 200, out
    assert out[0].headers["x-points-charged"] == "1"
    assert out[0].headers["x-points-remaining"] == str(10000 - 13), out[0].headers

    # The last call restarts the idle clock.
    r = http("GET", gw.url + "/v1/devices/last", headers=_auth(key))
    t_last = time.time()
    assert r.status == 200 and r.headers["x-points-remaining"] == str(10000 - 14), r.headers
    # People see the lease's free points as available: the admin API and the
    # gateway's balance endpoint.
    view = stack.admin("GET", f"/v1/accounts/{acct}").json()
    h = stack.hot(acct)
    assert view["live"] is True, view
    assert view["available"] == 10000 - h["spent"] == 10000 - 14, (view, h)
    assert view["held"] == 0, (view, h)
    b = http("GET", gw.url + "/_billing/balance", headers=_auth(key)).json()
    assert b == {"account_id": acct, "available": 10000 - 14, "held": 0}, (b, h)

    # Idle: given back after GATEWAY_LEASE_IDLE_MS (1 s, ticks of 100 ms), not before.
    time.sleep(max(0.0, t_last + 0.6 - time.time()))
    assert _leases(stack, acct), "the lease went back before its idle time"
    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=5,
                   what="the idle lease given back")
    took = time.time() - t_last
    assert took < 1.0 + 1.5, took  # idle 1 s, ticks of 100 ms, a loaded 2-core machine
    h = stack.hot(acct)
    assert stack.redis_raw("EXISTS", f"pg:{{{acct}}}:holds") == "0", _holds(stack, acct)
    assert h["held"] == 0 and h["leasefree"] == 0 and h["spent"] == 14, h

    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == 14 and view["balance"] == 10000 - 14, view
    assert view["available"] == view["credited"] - view["spent"] == 10000 - 14, view
    # One charges row per call, under the answer's X-Request-Id.
    rows = _charges(stack, acct)
    rids = [a.headers["x-request-id"] for a in answers + out + [r]]
    assert len(rows) == 14 and set(rows) == set(rids), (rows, rids)
    assert all(rows[x] == (1, "commit", "device.read", 200, 1) for x in rids), rows
    assert gw.stop() == 0, _log(gw)


def test_no_lease_for_small_balances_or_when_disabled(stack):
    """The 4x rule (a lease only when available >= 4 x its block) and
    GATEWAY_LEASE_CALLS=0: per-call holds only, no lease field ever."""
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "4", "GATEWAY_THREADS": "1"})
    off = _gateway(stack, {"GATEWAY_LEASE_CALLS": "0", "GATEWAY_THREADS": "1"}, name="gateway-nolease")
    small, small_key = _account(stack, 16)  # 15 left after the first call: < 4 x 4
    big, big_key = _account(stack, 10000)
    for i in range(5):
        for url, k in ((gw.url, small_key), (off.url, big_key)):
            r = http("GET", url + f"/v1/devices/d{i}", headers=_auth(k))
            assert r.status == 200, r
        time.sleep(0.05)
        assert not _holds(stack, small) and not _holds(stack, big), (_holds(stack, small),
                                                                    _holds(stack, big))
    assert r.headers["x-points-remaining"] == "9995"
    for a in (small, big):
        h = stack.hot(a)
        assert h["held"] == 0 and h.get("leasefree", 0) == 0 and h["spent"] == 5, h
    # The same big account through the leasing gateway does get one.
    r = http("GET", gw.url + "/v1/devices/x", headers=_auth(big_key))
    assert r.status == 200
    stack.wait_for(lambda: _leases(stack, big), timeout=5, what="a lease for the big account")
    assert gw.stop() == 0 and off.stop() == 0
    assert _no_leases_left(stack, big), (stack.hot(big), _holds(stack, big))


def test_usage_priced_and_failed_calls_from_a_lease(stack):
    """A lease started by the usage-priced route (hold 100) serves it and the
    1-point route: each answer charges units x 2 (capped at the hold) and
    shows the exact remaining; an upstream timeout and a client that leaves
    cost nothing; Postgres gets each call's row with its hold."""
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "4", "GATEWAY_LEASE_IDLE_MS": "60000",
                          "GATEWAY_THREADS": "1"})
    acct, key = _account(stack, 100000)
    spent, expect = 0, {}  # rid -> (amount, outcome, route, status, hold)

    def batch(units, delay=0):
        h = dict(_auth(key), **{"X-Sim-Usage": units})
        if delay:
            h["X-Sim-Delay-Ms"] = str(delay)
        return http("POST", gw.url + "/v1/batch", {"items": [1]}, h)

    r = batch("7")
    assert r.status == 200 and r.headers["x-points-charged"] == "14", r.headers
    spent += 14
    expect[r.headers["x-request-id"]] = (14, "commit", "device.batch", 200, 100)
    stack.wait_for(lambda: _leases(stack, acct), timeout=5, what="a lease")
    (lid, (amount, *_)), = _leases(stack, acct).items()
    assert amount == 400, ("a lease of 4 calls of the hold (100)", amount)
    for units, charged in [("0", 0), ("3", 6), ("50", 100), ("60", 100), ("junk", 100)]:
        r = batch(units)
        assert r.status == 200 and r.headers["x-points-charged"] == str(charged), (units, r.headers)
        spent += charged
        assert r.headers["x-points-remaining"] == str(100000 - spent), (units, r.headers, spent)
        expect[r.headers["x-request-id"]] = (charged, "commit", "device.batch", 200, 100)
        r = http("GET", gw.url + "/v1/devices/d", headers=_auth(key))
        assert r.status == 200 and r.headers["x-points-remaining"] == str(100000 - spent - 1), r.headers
        spent += 1
        expect[r.headers["x-request-id"]] = (1, "commit", "device.read", 200, 1)
    # In flight, a usage-priced call is promised its hold from the lease.
    # Head and body in one write: a body that comes after its head is held
    # per call, for the body's deadline, not promised from a lease (request.c).
    out = []
    t = threading.Thread(target=lambda: out.append(_one_write(
        gw.port, "POST", "/v1/batch", b'{"items": [1]}',
        dict(_auth(key), **{"X-Sim-Usage": "2", "X-Sim-Delay-Ms": "500"}))))
    t.start()
    stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/stats").json()["in_flight"] == 1,
                   timeout=5, what="the call at the upstream")
    assert list(_holds(stack, acct)) == [lid], _holds(stack, acct)
    t.join(10)
    assert out[0].status == 200 and out[0].headers["x-points-charged"] == "4", out[0].headers
    spent += 4
    assert out[0].headers["x-points-remaining"] == str(100000 - spent), out[0].headers
    expect[out[0].headers["x-request-id"]] = (4, "commit", "device.batch", 200, 100)
    # Upstream timeout (route timeout 300 ms): 504, nothing charged.
    r = http("GET", gw.url + "/v1/slow/x", headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "1500"}))
    assert r.status == 504 and r.headers["x-points-charged"] == "0", r
    timeout_rid = r.headers["x-request-id"]
    # A client that leaves while its call is at the upstream: the call runs
    # on, and its answer charges it (from the lease) as if the client stayed.
    c = socket.create_connection(("127.0.0.1", gw.port))
    c.sendall(b"GET /v1/devices/gone HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
              b"\r\nX-Sim-Delay-Ms: 1500\r\n\r\n")
    last = stack.wait_for(
        lambda: (lambda j: j if j.get("path") == "/v1/devices/gone" else None)(
            http("GET", stack.devsim.url + "/_sim/last").json()),
        timeout=5, what="the leaving call at the upstream")
    gone_rid = last["x-request-id"]
    assert gone_rid != timeout_rid
    c.close()
    spent += 1
    expect[gone_rid] = (1, "commit", "device.read", 200, 1)
    # Its record is charged from the lease: nothing in flight, the rest free again.
    stack.wait_for(lambda: (lambda h: h["held"] == h["leasefree"] and
                            h["credited"] - h["spent"] == 100000 - spent)(stack.hot(acct)),
                   timeout=10, what="the leaving call charged from the lease")
    assert list(_holds(stack, acct)) == [lid], _holds(stack, acct)
    r = http("GET", gw.url + "/v1/devices/last", headers=_auth(key))
    spent += 1
    assert r.headers["x-points-remaining"] == str(100000 - spent), r.headers
    expect[r.headers["x-request-id"]] = (1, "commit", "device.read", 200, 1)
    assert gw.stop() == 0, _log(gw)
    assert _no_leases_left(stack, acct), (stack.hot(acct), _holds(stack, acct))
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == spent, (view, spent)
    rows = _charges(stack, acct)
    for rid, want in expect.items():
        assert rows.get(rid) == want, (rid, rows.get(rid), want)
    for rid in (timeout_rid,):
        assert rid in rows and rows[rid][0] == 0 and rows[rid][1] == "release", (rid, rows.get(rid))
    assert len(rows) == len(expect) + 1, rows


# ---- 2. conservation under concurrency ---------------------------------------

def test_conservation_under_concurrency_with_leases(stack):
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "8", "GATEWAY_LEASE_IDLE_MS": "300",
                          "GATEWAY_THREADS": "2"})
    points = 4000  # the usage route (hold 100) gets a lease of its own size too
    acct, key = _account(stack, points)
    watch = _LeaseWatch(stack, acct)
    before = _sim_requests(stack)

    def call(t, j):
        """(kind, the charge it must get, answer)"""
        h = _auth(key)
        if j % 5 == 1:
            h["X-Sim-Status"] = "500"
            return "fail", 0, http("GET", gw.url + f"/v1/devices/t{t}-{j}", headers=h)
        if j % 5 == 3:
            units = (t + j) % 4
            h["X-Sim-Usage"] = str(units)
            return "batch", 2 * units, http("POST", gw.url + "/v1/batch", {"items": [t, j]}, h)
        if j == 9:
            h["X-Sim-Status"] = "302"
            return "redirect", 1, http("GET", gw.url + f"/v1/devices/t{t}-{j}", headers=h)
        h["X-Sim-Delay-Ms"] = str((t * 7 + j) % 20)
        return "read", 1, http("GET", gw.url + f"/v1/devices/t{t}-{j}", headers=h)

    def worker(t):
        return [call(t, j) for j in range(10)]

    try:
        with concurrent.futures.ThreadPoolExecutor(40) as ex:
            res = [x for f in [ex.submit(worker, t) for t in range(40)] for x in f.result()]
    finally:
        watch.stop()
    assert len(res) == 400
    assert watch.max_leases >= 1, f"no lease seen in {watch.samples} samples: {_log(gw)}"
    assert not watch.bad, watch.bad[:3]
    codes = {}
    for kind, _, r in res:
        codes[(kind, r.status)] = codes.get((kind, r.status), 0) + 1
    expect_status = {"fail": 500, "batch": 200, "redirect": 302, "read": 200}
    bad = [(k, r) for k, _, r in res if r.status != expect_status[k]]
    assert not bad, (codes, bad[:5])  # in particular no 402 (false refusal) and no 503
    wrong = [(k, c, r.headers) for k, c, r in res if r.headers.get("x-points-charged") != str(c)]
    assert not wrong, wrong[:5]
    charged = sum(c for _, c, _ in res)
    assert _sim_requests(stack) == before + 400

    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=10,
                   what="idle leases given back")
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)  # Redis spent == Postgres spent == sum(charges)
    h = stack.hot(acct)
    assert h["spent"] == charged == view["spent"], (h, charged, view)
    assert h["held"] == 0 and h["leasefree"] == 0, h
    assert view["available"] == points - charged, view
    rows = _charges(stack, acct)
    assert len(rows) == 400, f"{len(rows)} charges rows for 400 answered calls"
    for kind, _, r in res:
        rid = r.headers["x-request-id"]
        assert rid in rows, (kind, r.status, rid)
        amount, outcome, route, status, hold = rows[rid]
        assert amount == int(r.headers["x-points-charged"]), (kind, r.headers, rows[rid])
        assert status == r.status, (kind, r.status, rows[rid])
        if kind == "fail":
            assert (amount, outcome) == (0, "release"), rows[rid]
        else:
            assert outcome == "commit", rows[rid]
        assert route == ("device.batch" if kind == "batch" else "device.read"), rows[rid]
        assert hold == (100 if kind == "batch" else 1), rows[rid]
    assert gw.stop() == 0, _log(gw)


# ---- 3. no false refusal across gateways; the storm ----------------------------

def _spend_down(stack, url, key, acct, to):
    """Per-call calls through URL (a gateway without leases) until the account's
    real available (credited - spent - held) is TO; none of them is short."""
    while True:
        a = _real_available(stack, acct)
        if a - to >= 5:
            r = http("POST", url + "/v1/devices/d/commands", {}, _auth(key))
            assert r.status == 202, r
        elif a > to:
            r = http("GET", url + "/v1/devices/d", headers=_auth(key))
            assert r.status == 200, r
        else:
            assert a == to, a
            return


def _lease_on_a_rest_spent_on_b(stack, b_wait_ms):
    """Gateway A (leases of 8 calls, never idle) and gateway B (no leases,
    waits B_WAIT_MS for held points) on one 64-point account: A takes a
    lease with its calls, then B spends every point outside it. Returns
    (a, b, acct, key)."""
    _base(stack)
    a = _gateway(stack, {"GATEWAY_LEASE_CALLS": "8", "GATEWAY_LEASE_IDLE_MS": "60000",
                         "GATEWAY_THREADS": "1"}, name="gateway-a")
    b = _gateway(stack, {"GATEWAY_LEASE_CALLS": "0", "GATEWAY_THREADS": "1",
                         "HOLD_WAIT_MS": str(b_wait_ms)}, name="gateway-b")
    acct, key = _account(stack, 64)
    answers = _calls(a.url, key, 3, "a")
    assert [r.headers["x-points-remaining"] for r in answers] == ["63", "62", "61"], answers
    assert len(_leases(stack, acct)) == 1, (_holds(stack, acct), _log(a))
    _spend_down(stack, b.url, key, acct, 0)
    return a, b, acct, key


def test_lease_gives_back_to_a_caller_on_another_gateway(stack):
    """The seed case with leases: gateway A's idle lease sits on points that a
    call on gateway B needs (B's price > available, <= available + held):
    B's call is served within seconds, not refused."""
    # B waits at most 5 s for held points (default: UPSTREAM_TIMEOUT_MS + 1 s).
    a, b, acct, key = _lease_on_a_rest_spent_on_b(stack, 5000)
    leases = _leases(stack, acct)
    assert len(leases) == 1, _holds(stack, acct)
    lid, (amount, _seq, free, _dl, _soft) = next(iter(leases.items()))
    assert free == amount >= 5, (leases, "the lease must hold enough for the 5-point call")
    _seq = _leases(stack, acct)[lid][1]
    h = stack.hot(acct)
    assert h["held"] == amount and h["credited"] - h["spent"] == amount, h
    assert "contend" not in h, ("no reserve was short yet", h)
    # A 5-point call on B: available 0 < 5 <= 0 + held.
    t0 = time.time()
    r = http("POST", b.url + "/v1/devices/d/commands", {}, _auth(key), timeout=30)
    took = time.time() - t0
    seq_after = {f: v[1] for f, v in _leases(stack, acct).items()}
    assert r.status == 202, (r, f"after {took:.1f}s", stack.hot(acct), _holds(stack, acct),
                             f"lease seq {_seq} -> {seq_after}", _log(a))
    assert took < 3.0, took
    assert r.headers["x-points-charged"] == "5"
    assert r.headers["x-points-remaining"] == str(amount - 5), (r.headers, amount)
    assert "contended, giving back" in a.output(), _log(a)
    stack.wait_for(lambda: not _leases(stack, acct), timeout=5, what="A's lease gone")
    h = stack.hot(acct)
    assert h["held"] == 0 and h["leasefree"] == 0, h
    assert h["credited"] - h["spent"] == amount - 5, h
    # A still serves the account (per-call holds now).
    if amount - 5 >= 1:
        r = http("GET", a.url + "/v1/devices/again", headers=_auth(key))
        assert r.status == 200 and r.headers["x-points-remaining"] == str(amount - 6), r.headers
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == h["spent"] + (1 if amount - 5 >= 1 else 0), view
    assert a.stop() == 0 and b.stop() == 0


def test_storm_through_a_leased_gateway(stack):
    """100 points (after a warm-up call that starts a lease), 300 concurrent
    1-point calls: exactly 100 served, 200 refused, 100 charged."""
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "4", "GATEWAY_LEASE_IDLE_MS": "60000",
                          "GATEWAY_THREADS": "2"})
    acct, key = _account(stack, 101)
    r = http("GET", gw.url + "/v1/devices/warm", headers=_auth(key))
    assert r.status == 200 and r.headers["x-points-remaining"] == "100", r.headers
    stack.wait_for(lambda: _leases(stack, acct), timeout=5, what="a lease before the storm")
    before = _sim_requests(stack)

    def call(i):
        return http("GET", gw.url + f"/v1/devices/d{i}",
                    headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "20"}), timeout=60)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(300) as ex:
        res = list(ex.map(call, range(300)))
    took = time.time() - t0
    codes = [r.status for r in res]
    assert codes.count(200) == 100 and codes.count(402) == 200, \
        ({c: codes.count(c) for c in set(codes)}, stack.hot(acct), _log(gw))
    assert all(r.json()["error"] == "insufficient_points" for r in res if r.status == 402)
    assert _sim_requests(stack) == before + 100
    assert took < 20, took
    # No answer shows a remaining figure below what is left, nor above the start.
    rem = [int(r.headers["x-points-remaining"]) for r in res if r.status == 200
           and "x-points-remaining" in r.headers]
    assert rem and min(rem) == 0 and max(rem) <= 99, sorted(rem)[:5]
    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=10,
                   what="leases given back (spent out or contended)")
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == 101 and view["balance"] == 0 and view["available"] == 0, view
    served = {r.headers["x-request-id"] for r in res if r.status == 200}
    rows = _charges(stack, acct)
    assert served <= set(rows), served - set(rows)
    assert sum(a for a, *_ in rows.values()) == 101
    assert gw.stop() == 0, _log(gw)


# ---- 4. kill -9 of a gateway that holds a lease ---------------------------------

def test_dead_gateways_idle_lease_does_not_outlast_a_callers_wait(stack):
    """Gateway A dies (kill -9) holding an idle lease; its deadline is
    20 s away (UPSTREAM_TIMEOUT_MS + HOLD_GRACE_MS, the defaults), longer
    than a caller waits. The lease's free points go back at its soft
    deadline (3 s after its last op), so a call on gateway B that needs them
    is served within its wait instead of refused."""
    a, b, acct, key = _lease_on_a_rest_spent_on_b(stack, 8000)
    lid, (amount, _seq, free, deadline, soft) = next(iter(_leases(stack, acct).items()))
    assert free == amount >= 5 and deadline - soft > 10000, _leases(stack, acct)
    a.kill9()
    t0 = time.time()
    r = http("POST", b.url + "/v1/devices/d/commands", {}, _auth(key), timeout=30)
    took = time.time() - t0
    assert r.status == 202, (r, f"after {took:.1f}s", stack.hot(acct), _holds(stack, acct))
    assert took < 6.0, took  # soft deadline (<= 3 s) + a sweep (1 s), not the 20 s one
    assert r.headers["x-points-charged"] == "5"
    # The lease is still there (its deadline covers calls that were in
    # flight), holding nothing; the account's figures are whole.
    h = stack.hot(acct)
    assert h["held"] == 0 and h["leasefree"] == 0 and h["credited"] - h["spent"] == amount - 5, h
    assert _leases(stack, acct)[lid][0] == 0, _leases(stack, acct)
    # (Not stack.drained: the empty lease stays until its deadline, 20 s.)
    stack.wait_for(lambda: stack.redis_raw("XLEN", "pg:outbox") == "0", timeout=20,
                   what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == 64 - (amount - 5), view


def test_kill9_lease_expired_by_sweeper_at_no_cost(stack):
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "16", "GATEWAY_LEASE_IDLE_MS": "60000",
                          "GATEWAY_THREADS": "1", "UPSTREAM_TIMEOUT_MS": "1000",
                          "HOLD_GRACE_MS": "1000"})
    acct, key = _account(stack, 1000)
    answered = []
    for i in range(5):
        r = http("GET", gw.url + f"/v1/devices/d{i}", headers=_auth(key))
        assert r.status == 200 and r.headers["x-points-remaining"] == str(999 - i), r
        answered.append(r.headers["x-request-id"])
    leases = _leases(stack, acct)
    assert len(leases) == 1, (_holds(stack, acct), _log(gw))
    lid = next(iter(leases))
    errors, done = [], []

    def slow(i):
        try:
            done.append(http("GET", gw.url + f"/v1/devices/s{i}",
                             headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "900"}), timeout=10))
        except Exception as e:  # noqa: BLE001 - the gateway dies under it
            errors.append(e)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/stats").json()["in_flight"] == 3,
                   timeout=5, what="3 calls at the upstream")
    assert list(_holds(stack, acct)) == [lid], ("in-flight calls not served by the lease",
                                              _holds(stack, acct))
    gw.kill9()
    t_kill = time.time()
    for t in threads:
        t.join(15)
    assert len(errors) == 3 and not done, (errors, done)
    # The deadline (last op + 1000 + 1000 ms) has not passed yet.
    assert lid in _leases(stack, acct), "lease expired before its deadline"
    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=10,
                   what="the dead gateway's lease expired by the sweeper")
    took = time.time() - t_kill
    assert took < 2.0 + 2.0, took
    assert took > 1.0, ("expired before its deadline", took)
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == 5 and view["available"] == 1000 - 5 and view["held"] == 0, view
    rows = _charges(stack, acct)
    assert set(rows) == set(answered), ("only the answered calls are charged", rows)
    assert all(v[:2] == (1, "commit") for v in rows.values()), rows
    assert not [x for x in rows if x.startswith("L")], rows  # no record for the lease itself
    # A new gateway serves the account at once.
    gw2 = _gateway(stack, {"GATEWAY_LEASE_CALLS": "16", "GATEWAY_THREADS": "1"}, name="gateway-2")
    r = http("GET", gw2.url + "/v1/devices/x", headers=_auth(key))
    assert r.status == 200 and r.headers["x-points-remaining"] == "994", r.headers
    assert gw2.stop() == 0


def test_sigterm_gives_the_lease_back(stack):
    """A stopping gateway gives its leases back before it exits (not left
    for the sweeper's deadline, 20 s by default)."""
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "16", "GATEWAY_LEASE_IDLE_MS": "60000",
                          "GATEWAY_THREADS": "2"})
    acct, key = _account(stack, 1000)
    _calls(gw.url, key, 8)
    assert _leases(stack, acct), _holds(stack, acct)
    t0 = time.time()
    gw.signal(signal.SIGTERM)
    assert gw.p.wait(15) == 0, _log(gw)
    assert time.time() - t0 < 5
    assert _no_leases_left(stack, acct), (stack.hot(acct), _holds(stack, acct), _log(gw))
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    assert view["spent"] == 8 and view["available"] == 992, view


# ---- 5. a negative adjustment against leased points ------------------------------

def test_negative_adjustment_on_leased_points(stack):
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "8", "GATEWAY_LEASE_IDLE_MS": "60000",
                          "GATEWAY_THREADS": "1"})
    acct, key = _account(stack, 64)
    _calls(gw.url, key, 3)
    leases = _leases(stack, acct)
    assert len(leases) == 1, (_holds(stack, acct), _log(gw))
    amount = next(iter(leases.values()))[0]
    assert amount >= 5, leases
    # First take back what the lease does not hold, but 2 points.
    avail = _real_available(stack, acct)
    r = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                    {"amount": -(avail - 2), "reason": "test: below the lease"})
    assert r.status == 201, r
    assert _real_available(stack, acct) == 2 and _leases(stack, acct), \
        (stack.hot(acct), _holds(stack, acct))
    # More than available, less than available + the idle lease: must succeed.
    take = 2 + amount - 1
    seq0 = {f: v[1] for f, v in _leases(stack, acct).items()}
    t0 = time.time()
    r = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                    {"amount": -take, "reason": "test: into the lease"})
    took = time.time() - t0
    seq1 = {f: v[1] for f, v in _leases(stack, acct).items()}
    assert r.status == 201, ("a negative adjustment covered by available + an idle gateway's "
                             "lease was refused", r, f"after {took:.1f}s", stack.hot(acct),
                             _holds(stack, acct), f"lease seq {seq0} -> {seq1}", _log(gw))
    assert took < 3.0, took
    view = stack.admin("GET", f"/v1/accounts/{acct}").json()
    assert view["credited"] == 64 - (avail - 2) - take, view
    assert view["balance"] == 1 and view["available"] == 1, view
    stack.wait_for(lambda: not _leases(stack, acct), timeout=5, what="the lease given back")
    assert "contended, giving back" in gw.output(), _log(gw)
    # One point more than there is: refused at once.
    r = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                    {"amount": -2, "reason": "test: too much"})
    assert r.status == 409 and r.json()["error"] == "insufficient_points", r
    # The last point is still usable.
    r = http("GET", gw.url + "/v1/devices/last", headers=_auth(key))
    assert r.status == 200 and r.headers["x-points-remaining"] == "0", r.headers
    r = http("GET", gw.url + "/v1/devices/none", headers=_auth(key))
    assert r.status == 402, r
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=5, what="no lease")
    view = _conserved(stack, acct)
    assert view["spent"] == 4 and view["balance"] == 0, view
    assert gw.stop() == 0, _log(gw)


# ---- 6. Redis away while a lease is active ---------------------------------------

def test_redis_restart_with_an_active_lease(stack):
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "16", "GATEWAY_LEASE_IDLE_MS": "60000",
                          "GATEWAY_THREADS": "1"})
    acct, key = _account(stack, 1000)
    good = _calls(gw.url, key, 6)
    assert _leases(stack, acct), _holds(stack, acct)
    # A call served from the lease is at the upstream when Redis goes away.
    out = []
    t = threading.Thread(target=lambda: out.append(http(
        "GET", gw.url + "/v1/devices/slow", headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "1500"}))))
    t.start()
    stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/stats").json()["in_flight"] == 1,
                   timeout=5, what="the slow call at the upstream")
    before = _sim_requests(stack)
    stack.service("redis-stop")
    try:
        for i in range(5):
            r = http("GET", gw.url + f"/v1/devices/x{i}", headers=_auth(key))
            assert r.status == 503 and r.json()["error"] == "billing_unavailable", r
        # fail closed: nothing proxied (the slow call was sent before)
        assert _sim_requests(stack) == before
        t.join(10)
        assert out and out[0].status == 200, out
        assert out[0].headers["x-points-charged"] == "1", out[0].headers
        assert "x-points-remaining" not in out[0].headers, out[0].headers
    finally:
        stack.service("redis-start")
    good.append(out[0])
    stack.wait_for(lambda: http("GET", gw.url + "/v1/devices/probe",
                                headers=_auth(key)).status == 200,
                   timeout=15, what="served again")
    # Count every call made since, served or not.
    after = _calls(gw.url, key, 6, "y")
    assert int(after[-1].headers["x-points-remaining"]) == 1000 - stack.hot(acct)["spent"]
    # Give the lease back (SIGTERM) and let everything settle.
    assert gw.stop() == 0, _log(gw)
    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=10, what="lease given back")
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    view = _conserved(stack, acct)
    rows = _charges(stack, acct)
    served = [r.headers["x-request-id"] for r in good + after]
    assert all(x in rows and rows[x][:2] == (1, "commit") for x in served), \
        ([x for x in served if x not in rows], rows)
    # The probe calls of the wait loop (200s) are the only others.
    assert view["spent"] == sum(a for a, *_ in rows.values()) == len(rows), (view, rows)
    assert view["available"] == 1000 - view["spent"], view


# ---- lease.lua directly: a resent op is applied once ------------------------------


def test_redis_stalled_answers_lease_calls_without_waiting_for_it(stack):
    """Calls served from a lease whose records wait behind an op Redis never
    answers (SIGSTOP) are answered once the watchdog drops the link (charge
    to come, as per-call settles are), not when Redis wakes up; their
    records land after, each charged once."""
    _base(stack)
    gw = _gateway(stack, {"GATEWAY_LEASE_CALLS": "16", "GATEWAY_LEASE_IDLE_MS": "1000",
                          "GATEWAY_THREADS": "1"})
    acct, key = _account(stack, 1000)
    _calls(gw.url, key, 3, "w")
    assert _leases(stack, acct), _holds(stack, acct)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(http, "GET", gw.url + f"/v1/devices/s{i}",
                          headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "1000"}), timeout=30)
                for i in range(4)]
        stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/stats").json()["in_flight"] == 4,
                       timeout=5, what="4 calls at the upstream")
        pid = int(open(os.path.join(stack.dir, "redis", "redis.pid")).read())
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        try:
            res = [f.result() for f in futs]
            took = time.time() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
    assert [r.status for r in res] == [200] * 4, res
    assert all(r.headers["x-points-charged"] == "1" for r in res), [r.headers for r in res]
    assert took < 8, took  # the stall watchdog (3 s) and a resend, not Redis's wake-up
    stack.wait_for(lambda: _no_leases_left(stack, acct), timeout=20, what="lease given back")
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    view = _conserved(stack, acct)
    rows = _charges(stack, acct)
    served = [r.headers["x-request-id"] for r in res]
    assert all(rows[x][:2] == (1, "commit") for x in served), rows
    assert view["spent"] == 7 == len(rows), (view, rows)
    assert gw.stop() == 0

