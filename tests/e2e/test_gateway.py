"""bin/gateway: the request path end to end, on real Redis, billing and devsim.

Answers and headers for every outcome of one call (charged, refused,
unauthorized, no route, bad path, too large, upstream failures), what is and
is not forwarded upstream, usage pricing, the balance endpoint, and the
concurrency rules: the seed case (no false refusal while points are only
held) and a storm (no overdraft, exact counts).
"""
import concurrent.futures
import hashlib
import json
import re
import socket
import time

import harness
from harness import http, raw_http

ROUTES = {
    "charge_on": ["2xx", "3xx"],
    "routes": harness.DEFAULT_ROUTES["routes"] + [
        {"id": "device.slow", "method": "GET", "path": "/v1/slow/**", "price": 1,
         "timeout_ms": 300},
    ],
}


def key_hash(api_key):
    pepper = hashlib.blake2b(harness.PEPPER.encode(), digest_size=32).digest()
    return hashlib.blake2b(api_key.encode(), digest_size=32, key=pepper).hexdigest()


def _setup(stack, routes=None, env=None):
    """The module's stack (simulator, billing, gateway with ROUTES unless
    given), started on first use; the simulator's counters reset."""
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
        stack.wait_epoch()  # before it, an unknown key is rightly a 503, not a 401
        stack.start_gateway(routes or ROUTES, env=env)
    http("POST", stack.devsim.url + "/_sim/reset")
    return stack.gateway.url


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _sim_requests(stack):
    return http("GET", stack.devsim.url + "/_sim/stats").json()["requests"]


def _held_zero(stack, acct):
    stack.wait_for(lambda: stack.hot(acct).get("held", 0) == 0, timeout=10, what="held == 0")


def _settled(stack, acct, spent):
    """The account's calls are settled (nothing held) and it spent SPENT."""
    _held_zero(stack, acct)
    assert stack.hot(acct)["spent"] == spent, stack.hot(acct)


def test_charged_call_headers(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    r = http("GET", gw + "/v1/devices/thermo-1?verbose=1", headers=_auth(key))
    assert r.status == 200, r
    assert r.headers["x-points-charged"] == "1"
    assert r.headers["x-points-remaining"] == "9"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
    body = r.json()
    assert body["path"] == "/v1/devices/thermo-1"
    assert body["query"] == {"verbose": "1"}
    assert r.headers["content-type"] == "application/json"
    h = stack.hot(acct)
    assert h["spent"] == 1 and h["held"] == 0, h
    # X-Api-Key works as well, and the POST price applies.
    r = http("POST", gw + "/v1/devices/thermo-1/commands", {"cmd": "on"}, {"X-Api-Key": key})
    assert r.status == 202, r
    assert r.headers["x-points-charged"] == "5"
    assert r.headers["x-points-remaining"] == "4"
    assert r.json()["body_length"] == len(json.dumps({"cmd": "on"}))


def test_unauthorized(stack):
    gw = _setup(stack)
    before = _sim_requests(stack)
    unknown = "pgk_" + "A" * 43
    cases = [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
             {"X-Api-Key": "pgk_short"}, _auth(unknown), {"X-Api-Key": unknown}]
    for h in cases:
        r = http("GET", gw + "/v1/devices/d1", headers=h)
        assert r.status == 401, (h, r)
        assert r.json()["error"] == "unauthorized"
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert _sim_requests(stack) == before


def test_no_route_upstream_not_called(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    for method, path in [("GET", "/v1/nothing"), ("DELETE", "/v1/devices/d1"),
                         ("GET", "/v1/devices"), ("GET", "/v1/devices/a/b"),
                         ("POST", "/v1/devices/d1")]:
        r = http(method, gw + path, headers=_auth(key))
        assert r.status == 404, (method, path, r)
        assert r.json()["error"] == "no_route"
        assert "x-request-id" in r.headers
    assert _sim_requests(stack) == before
    assert stack.hot(acct)["spent"] == 0


def test_bad_paths(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    for path in ["/v1/devices/../devices/x", "//v1/devices/x", "/v1//devices/x",
                 "/v1/devices/a%2fb", "/v1/devices/a%2Fb", "/v1/devices/a%5cb",
                 "/v1/devices/a%00", "/v1/devices/%2e%2e", "/v1/devices/%zz",
                 "/v1/devices/./x"]:
        r = http("GET", gw + path, headers=_auth(key))
        assert r.status == 400, (path, r)
        assert r.json()["error"] == "bad_request"
    assert _sim_requests(stack) == before
    assert stack.hot(acct)["spent"] == 0


def test_body_too_large(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    big = b"x" * ((1 << 20) + 1)
    req = (b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
           b"\r\nContent-Length: " + str(len(big)).encode() + b"\r\nConnection: close\r\n\r\n")
    out = raw_http(stack.gateway.port, req + big)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    # Chunked: no length up front, refused once the limit is passed.
    chunked = (b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
               b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(17)) + b"0\r\n\r\n"
    out = raw_http(stack.gateway.port, chunked + body)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    # Exactly at the limit is fine.
    r = http("POST", gw + "/v1/devices/d1/commands", b"y" * (1 << 20), _auth(key))
    assert r.status == 202, r
    assert _sim_requests(stack) == before + 1
    h = stack.hot(acct)
    assert h["spent"] == 5 and h["held"] == 0, h


def test_upstream_5xx_costs_nothing(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    for status in (500, 503, 404, 429):
        r = http("GET", gw + "/v1/devices/d1", headers=dict(_auth(key), **{"X-Sim-Status": str(status)}))
        assert r.status == status, r
        assert r.headers["x-points-charged"] == "0"
        assert r.headers["x-points-remaining"] == "10"
    r = http("GET", gw + "/v1/devices/d1", headers=dict(_auth(key), **{"X-Sim-Status": "302"}))
    assert r.status == 302 and r.headers["x-points-charged"] == "1", r
    h = stack.hot(acct)
    assert h["spent"] == 1 and h["held"] == 0, h


def test_upstream_timeout_504(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    t0 = time.time()
    r = http("GET", gw + "/v1/slow/x", headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "3000"}))
    took = time.time() - t0
    assert r.status == 504, r
    assert r.json()["error"] == "upstream_timeout"
    assert took < 2.0, took
    h = stack.hot(acct)
    assert h["spent"] == 0 and h["held"] == 0, h


def test_upstream_response_too_large(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    r = http("GET", gw + "/v1/devices/d1",
             headers=dict(_auth(key), **{"X-Sim-Body-Bytes": str((1 << 20) + 10)}))
    assert r.status == 502, r
    assert r.json() == {"error": "upstream_unavailable", "message": "response too large"}
    r = http("GET", gw + "/v1/devices/d1",
             headers=dict(_auth(key), **{"X-Sim-Body-Bytes": str(1 << 20)}))
    assert r.status == 200 and len(r.body) == 1 << 20, r
    h = stack.hot(acct)
    assert h["spent"] == 1 and h["held"] == 0, h


def test_upstream_refused_502(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    dead = harness.free_port()
    gw = stack.spawn("gateway-dead", [stack.bin("gateway")], {
        "GATEWAY_LISTEN": f"127.0.0.1:{harness.free_port()}",
        "UPSTREAM_URL": f"http://127.0.0.1:{dead}", "ROUTES_FILE": stack.write_routes(ROUTES)})
    port = int(gw.env["GATEWAY_LISTEN"].rsplit(":", 1)[1])
    harness.wait_port(port, proc=gw.p)
    r = http("GET", f"http://127.0.0.1:{port}/v1/devices/d1", headers=_auth(key))
    assert r.status == 502, r
    assert r.json()["error"] == "upstream_unavailable"
    assert r.headers["x-points-charged"] == "0"
    h = stack.hot(acct)
    assert h["spent"] == 0 and h["held"] == 0, h
    assert gw.stop() == 0


def test_headers_forwarded(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    r = http("GET", gw + "/v1/devices/d1", headers={
        "Authorization": f"Bearer {key}", "X-Custom": "kept", "Connection": "X-Secret-Hop",
        "X-Secret-Hop": "dropped", "X-Account-Id": "999999", "X-Request-Id": "spoofed",
        "X-Forwarded-For": "10.0.0.1", "Keep-Alive": "timeout=5"})
    assert r.status == 200, r
    last = http("GET", stack.devsim.url + "/_sim/last").json()
    h = last
    assert "authorization" not in h and "x-api-key" not in h, h
    assert key not in json.dumps(last)
    assert h["x-account-id"] == str(acct), h
    assert h["x-request-id"] == r.headers["x-request-id"], h
    assert h["x-forwarded-for"] == "10.0.0.1, 127.0.0.1", h
    assert h["x-custom"] == "kept"
    assert "x-secret-hop" not in h and "keep-alive" not in h, h
    assert "expect" not in h
    http("GET", gw + "/v1/devices/d1", headers={"X-Api-Key": key})
    h = http("GET", stack.devsim.url + "/_sim/last").json()
    assert "x-api-key" not in h and "authorization" not in h, h


def test_balance_endpoint(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(7)
    before = _sim_requests(stack)
    r = http("GET", gw + "/_billing/balance", headers=_auth(key))
    assert r.status == 200, r
    assert r.json() == {"account_id": acct, "available": 7, "held": 0}
    assert http("GET", gw + "/_billing/balance").status == 401
    assert _sim_requests(stack) == before
    assert stack.hot(acct)["spent"] == 0


def test_usage_priced_route(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(1000)
    cases = [("7", 14), ("0", 0), ("80", 100), ("99999999999999999999", 100), ("junk", 100),
             ("-3", 100)]
    spent = 0
    for units, charged in cases:
        r = http("POST", gw + "/v1/batch", {"items": [1, 2]},
                 dict(_auth(key), **{"X-Sim-Usage": units}))
        assert r.status == 200, (units, r)
        assert r.headers["x-points-charged"] == str(charged), (units, r.headers)
        spent += charged
        assert r.headers["x-points-remaining"] == str(1000 - spent)
    # A failed usage call releases the whole hold.
    r = http("POST", gw + "/v1/batch", {"items": []},
             dict(_auth(key), **{"X-Sim-Usage": "5", "X-Sim-Status": "500"}))
    assert r.status == 500 and r.headers["x-points-charged"] == "0", r
    # The hold is what must be available: 99 points are not enough.
    acct2, key2 = stack.new_account(99)
    r = http("POST", gw + "/v1/batch", {"items": [1]}, _auth(key2))
    assert r.status == 402, r
    assert r.json()["cost"] == 100 and r.json()["available"] == 99
    h = stack.hot(acct)
    assert h["spent"] == spent and h["held"] == 0, h


def test_insufficient_points_402(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(3)
    before = _sim_requests(stack)
    r = http("POST", gw + "/v1/devices/d1/commands", {}, _auth(key))
    assert r.status == 402, r
    assert r.json() == {"error": "insufficient_points", "message": r.json()["message"],
                        "cost": 5, "available": 3, "held": 0}
    assert "x-request-id" in r.headers
    assert _sim_requests(stack) == before
    # Account with a key but never credited: 402 with available 0.
    acct0, key0 = stack.new_account(0)
    r = http("GET", gw + "/v1/devices/d1", headers=_auth(key0))
    assert r.status == 402 and r.json()["available"] == 0, r


def test_seed_case_no_false_refusal(stack):
    """4 points, 5 concurrent 1-point calls, one fails upstream after a delay:
    the other four are served, none refused."""
    gw = _setup(stack)
    acct, key = stack.new_account(4)

    def call(i):
        h = _auth(key)
        if i == 0:
            h.update({"X-Sim-Status": "500", "X-Sim-Delay-Ms": "500"})
        else:
            h.update({"X-Sim-Delay-Ms": "100"})
        return http("GET", gw + f"/v1/devices/d{i}", headers=h)

    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        futs = [ex.submit(call, 0)]
        time.sleep(0.1)  # the failing call holds its point first
        futs += [ex.submit(call, i) for i in range(1, 5)]
        res = [f.result() for f in futs]
    assert res[0].status == 500, res[0]
    assert [r.status for r in res[1:]] == [200] * 4, res
    h = stack.hot(acct)
    assert h["spent"] == 4 and h["held"] == 0, h


def test_storm_no_overdraft(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(100)
    before = _sim_requests(stack)

    def call(i):
        return http("GET", gw + f"/v1/devices/d{i}", headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "20"}))

    with concurrent.futures.ThreadPoolExecutor(300) as ex:
        res = list(ex.map(call, range(300)))
    codes = [r.status for r in res]
    # A refusal is 402 or, for a call past GATEWAY_MAX_WAITERS waiting on one
    # worker while the points were held, 503 too_many_waiting: never a serve.
    assert codes.count(200) == 100 and codes.count(402) + codes.count(503) == 200, \
        {c: codes.count(c) for c in set(codes)}
    assert all(r.json()["error"] == "insufficient_points" for r in res if r.status == 402)
    assert all(r.json()["error"] == "too_many_waiting" for r in res if r.status == 503)
    assert _sim_requests(stack) == before + 100
    h = stack.hot(acct)
    assert h["spent"] == 100 and h["held"] == 0, h
    assert h["credited"] - h["spent"] - h["held"] == 0


def test_client_gone_after_send_is_charged(stack):
    """Issue 10: a client that leaves once its call was written to the
    upstream does not cancel it; the upstream's answer settles it."""
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    s = socket.create_connection(("127.0.0.1", stack.gateway.port))
    s.sendall(b"GET /v1/devices/gone1 HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
              b"\r\nX-Sim-Delay-Ms: 1500\r\n\r\n")
    stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/last").json().get("path") ==
                   "/v1/devices/gone1", timeout=5, what="the call at the upstream")
    s.close()
    time.sleep(0.3)
    assert stack.hot(acct)["held"] == 1  # not released: the upstream is working on it
    _held_zero(stack, acct)
    h = stack.hot(acct)
    assert h["spent"] == 1, h
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert stack.psql(f"select amount, outcome from charges where account_id = {acct}") == \
        [["1", "commit"]]


def test_revoke_effective_within_2s(stack):
    """A real revoke (admin API: Postgres, then the Redis mirror) stops the key on
    every worker within 2 s, and billing's repair pass keeps it stopped."""
    gw = _setup(stack)
    acct, _ = stack.new_account(100)
    made = stack.admin("POST", f"/v1/accounts/{acct}/keys").json()
    key = made["api_key"]
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200
    assert stack.admin("DELETE", f"/v1/keys/{made['key_id']}").status == 204
    t0 = time.time()
    while True:
        # Hit every worker: fresh connections spread over SO_REUSEPORT sockets.
        answers = [http("GET", gw + "/v1/devices/d1", headers=_auth(key)) for _ in range(8)]
        if all(a.status == 401 for a in answers):
            break
        assert time.time() - t0 < 2.0, (answers, stack.hot(acct))
        time.sleep(0.05)
    # Still refused after the repair pass (every 3 s in tests) has run.
    time.sleep(3.5)
    assert all(http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 401
               for _ in range(8))
    # Another key of the same account works at once (nothing negative-cached).
    other = stack.admin("POST", f"/v1/accounts/{acct}/keys").json()["api_key"]
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(other)).status == 200


def test_sighup_reloads_routes(stack):
    import http.client as hc
    import signal
    gw = _setup(stack)
    acct, key = stack.new_account(1000)

    def fresh(method, path):
        return [http(method, gw + path, {} if method == "POST" else None, _auth(key))
                for _ in range(6)]  # fresh connections: reach every worker

    assert http("GET", gw + "/v1/things/t1", headers=_auth(key)).json()["error"] == "no_route"
    assert http("POST", gw + "/v1/devices/d1/commands", {}, _auth(key)).status == 202
    # A keep-alive connection opened before the reload survives it.
    conn = hc.HTTPConnection("127.0.0.1", stack.gateway.port, timeout=10)
    conn.request("GET", "/v1/devices/d1", headers=_auth(key))
    r1 = conn.getresponse()
    r1.read()
    assert r1.status == 200 and r1.getheader("X-Points-Charged") == "1"

    routes = json.loads(json.dumps(ROUTES))
    routes["routes"][0]["price"] = 2
    del routes["routes"][1]
    routes["routes"].append({"id": "thing.read", "method": "GET", "path": "/v1/things/*",
                             "price": 3, "charge_on": ["2xx", "4xx"]})
    path = stack.gateway.env["ROUTES_FILE"]
    with open(path, "w") as f:
        json.dump(routes, f)
    stack.gateway.signal(signal.SIGHUP)
    stack.wait_for(lambda: all(r.headers.get("x-points-charged") == "2"
                               for r in fresh("GET", "/v1/devices/d1")), timeout=5,
                   what="new price on every worker")
    assert all(r.status == 404 and r.json()["error"] == "no_route"
               for r in fresh("POST", "/v1/devices/d1/commands"))
    # The new route reaches the upstream (devsim answers 404 not_found), and its
    # own charge_on makes that 4xx billable.
    r = http("GET", gw + "/v1/things/t1", headers=_auth(key))
    assert r.status == 404 and r.json()["error"] == "not_found", r
    assert r.headers["x-points-charged"] == "3"
    conn.request("GET", "/v1/devices/d2", headers=_auth(key))
    r2 = conn.getresponse()
    r2.read()
    assert r2.status == 200 and r2.getheader("X-Points-Charged") == "2"
    conn.close()
    # A broken file on reload keeps the current table.
    with open(path, "w") as f:
        f.write("{not json")
    stack.gateway.signal(signal.SIGHUP)
    stack.wait_for(lambda: "routes reload failed" in stack.gateway.output(), timeout=5,
                   what="reload error logged")
    assert stack.gateway.alive()
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).headers["x-points-charged"] == "2"
    # A route id starting with '_' is refused too: that prefix marks
    # billing's own holds, which settlement does not count as calls.
    with open(path, "w") as f:
        json.dump({"routes": [{"id": "_x", "method": "GET", "path": "/**", "price": 9}]}, f)
    stack.gateway.signal(signal.SIGHUP)
    stack.wait_for(lambda: "not starting with '_'" in stack.gateway.output(), timeout=5,
                   what="reload error logged")
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).headers["x-points-charged"] == "2"
    # And '~', which marks a gateway's point lease: such a route's holds
    # would be taken for a lease and never settled.
    n_refused = stack.gateway.output().count("not starting with '_' or '~'")
    with open(path, "w") as f:
        json.dump({"routes": [{"id": "~lease", "method": "GET", "path": "/**", "price": 9}]}, f)
    stack.gateway.signal(signal.SIGHUP)
    stack.wait_for(lambda: stack.gateway.output().count("not starting with '_' or '~'") > n_refused,
                   timeout=5, what="reload error logged")
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).headers["x-points-charged"] == "2"
    with open(path, "w") as f:
        json.dump(ROUTES, f)
    stack.gateway.signal(signal.SIGHUP)
    stack.wait_for(lambda: all(r.status == 202 for r in fresh("POST", "/v1/devices/d1/commands")),
                   timeout=5, what="routes restored")
    _held_zero(stack, acct)


def test_script_flush_falls_back_to_eval(stack):
    """NOSCRIPT (scripts flushed, or a Redis that lost its cache) is retried
    with EVAL: calls keep working and nothing is lost or doubled."""
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200
    stack.redis("SCRIPT", "FLUSH")
    for i in range(6):
        r = http("GET", gw + f"/v1/devices/d{i}", headers=_auth(key))
        assert r.status == 200, r
    assert r.headers["x-points-remaining"] == "3"
    h = stack.hot(acct)
    assert h["spent"] == 7 and h["held"] == 0, h


# ---- /_billing/usage: the caller's own usage, free, from the rollups ---------

def _usage_window():
    """from/to (to exclusive) around today in UTC, whatever day the rollup uses."""
    import datetime
    today = datetime.datetime.now(datetime.timezone.utc).date()
    return str(today - datetime.timedelta(days=2)), str(today + datetime.timedelta(days=2))


def _usage(gw, key, frm, to):
    return http("GET", gw + f"/_billing/usage?from={frm}&to={to}", headers=_auth(key) if key else {})


def test_usage_endpoint_matches_finance_report(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(200)  # the batch route holds 100
    other, other_key = stack.new_account(100, name="other")
    before = _sim_requests(stack)
    last = None
    for i in range(3):
        last = http("GET", gw + f"/v1/devices/d{i}", headers=_auth(key))
        assert last.status == 200, last
    for status in ("500", "503"):
        last = http("GET", gw + "/v1/devices/d9", headers=dict(_auth(key), **{"X-Sim-Status": status}))
        assert last.status == int(status), last
    last = http("POST", gw + "/v1/devices/d1/commands", {"cmd": "on"}, _auth(key))
    assert last.status == 202, last
    r = http("POST", gw + "/v1/batch", {"items": [1]}, dict(_auth(key), **{"X-Sim-Usage": "3"}))
    assert r.status == 200 and r.headers["x-points-charged"] == "6", r
    last = r
    # Another account's calls must never show up in this account's report.
    assert http("GET", gw + "/v1/devices/x", headers=_auth(other_key)).status == 200
    assert http("POST", gw + "/v1/devices/x/commands", {}, _auth(other_key)).status == 202
    proxied = _sim_requests(stack) - before
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    _held_zero(stack, acct)

    frm, to = _usage_window()
    r = _usage(gw, key, frm, to)
    assert r.status == 200, r
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-points-charged"] == "0"
    got = r.json()
    assert got["account_id"] == acct and got["from"] == frm and got["to"] == to, got
    fin = stack.admin("GET", f"/v1/reports/usage?from={frm}&to={to}&account={acct}"
                              "&group_by=route,day")
    assert fin.status == 200, fin
    fin = fin.json()
    assert got["rows"] == fin["rows"], (got, fin)
    assert got["totals"] == fin["totals"], (got, fin)
    # The figures themselves: 3 reads + 2 failed reads, 1 command, 1 batch of 3 units.
    by_route = {row["route"]: row for row in got["rows"]}
    assert set(by_route) == {"device.read", "device.command", "device.batch"}, got
    assert (by_route["device.read"]["calls"], by_route["device.read"]["points"],
            by_route["device.read"]["failed_calls"]) == (5, 3, 2), got
    assert got["totals"]["points"] == 3 + 5 + 6, got
    assert got["totals"]["points"] == int(stack.scalar(f"select spent from accounts where id = {acct}"))
    # The other account sees only its own rows.
    o = _usage(gw, other_key, frm, to).json()
    assert o["account_id"] == other
    assert {row["route"] for row in o["rows"]} == {"device.read", "device.command"}, o
    assert o["totals"]["points"] == 6, o
    # Free and not proxied; the balance endpoint agrees with the last call.
    assert _sim_requests(stack) == before + proxied
    b = http("GET", gw + "/_billing/balance", headers=_auth(key)).json()
    assert b["available"] == int(last.headers["x-points-remaining"]) == 200 - 14, (b, last.headers)
    assert stack.hot(acct)["spent"] == 14
    # An empty window is an empty report, not an error.
    r = _usage(gw, key, "2001-01-01", "2001-02-01")
    assert r.status == 200, r
    assert r.json()["rows"] == [] and r.json()["totals"] == {"calls": 0, "points": 0,
                                                               "failed_calls": 0}, r


def test_usage_endpoint_bad_input(stack):
    gw = _setup(stack)
    acct, key = stack.new_account(5)
    before = _sim_requests(stack)
    for q in ["", "?from=2024-01-01", "?to=2024-01-02", "?from=2024-02-30&to=2024-03-01",
              "?from=2023-02-29&to=2023-03-01", "?from=2024-13-01&to=2024-12-01",
              "?from=2024-1-01&to=2024-02-01", "?from=2024-01-01&to=2024-01-01",
              "?from=2024-02-01&to=2024-01-01", "?from=1999-12-31&to=2000-01-02",
              "?from=2024-01-01x&to=2024-02-01", "?from=2024-01-01&to=2025-01-02"]:
        r = http("GET", gw + "/_billing/usage" + q, headers=_auth(key))
        assert r.status == 400, (q, r)
        assert r.json()["error"] == "bad_request", (q, r)
    # 366 days is the longest window; a leap day is a real date.
    assert _usage(gw, key, "2024-01-01", "2025-01-01").status == 200
    assert _usage(gw, key, "2024-02-29", "2024-03-01").status == 200
    # No key, bad key, unknown key: 401 whatever the dates.
    for h in [{}, {"Authorization": "Bearer nope"}, _auth("pgk_" + "A" * 43)]:
        r = http("GET", gw + "/_billing/usage?from=2024-01-01&to=2024-02-01", headers=h)
        assert r.status == 401 and r.json()["error"] == "unauthorized", (h, r)
    assert http("POST", gw + "/_billing/usage?from=2024-01-01&to=2024-02-01", {},
                _auth(key)).status == 404
    assert _sim_requests(stack) == before
    assert stack.hot(acct)["spent"] == 0


def test_usage_endpoint_without_postgres(stack):
    """DATABASE_URL at a closed port (or unset): 503 for this endpoint only;
    proxied calls and the balance keep working."""
    _setup(stack)
    acct, key = stack.new_account(10)
    frm, to = _usage_window()
    for dburl in (f"postgresql://127.0.0.1:{harness.free_port()}/pointgate?connect_timeout=2", ""):
        gw = stack.spawn("gateway-nopg", [stack.bin("gateway")], {
            "GATEWAY_LISTEN": f"127.0.0.1:{harness.free_port()}", "DATABASE_URL": dburl,
            "UPSTREAM_URL": stack.devsim.url, "ROUTES_FILE": stack.write_routes(ROUTES)})
        port = int(gw.env["GATEWAY_LISTEN"].rsplit(":", 1)[1])
        harness.wait_port(port, proc=gw.p)
        url = f"http://127.0.0.1:{port}"
        for _ in range(3):  # lazily retried each time, never stuck
            t0 = time.time()
            r = _usage(url, key, frm, to)
            assert r.status == 503 and r.json()["error"] == "usage_unavailable", (dburl, r)
            assert time.time() - t0 < 3
        r = http("GET", url + "/v1/devices/d1", headers=_auth(key))
        assert r.status == 200, r
        b = http("GET", url + "/_billing/balance", headers=_auth(key))
        assert b.status == 200 and b.json()["available"] == int(r.headers["x-points-remaining"])
        assert _usage(url, None, frm, to).status == 401
        assert gw.stop() == 0, gw.output()[-3000:]
    _held_zero(stack, acct)


def test_usage_endpoint_concurrent(stack):
    """Many reports at once on few connections: queued per worker, all answered."""
    gw = _setup(stack)
    acct, key = stack.new_account(10)
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    frm, to = _usage_window()
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        res = list(ex.map(lambda i: _usage(gw, key, frm, to), range(200)))
    assert all(r.status == 200 for r in res), {r.status for r in res}
    assert all(r.json()["totals"]["points"] == 1 for r in res)
