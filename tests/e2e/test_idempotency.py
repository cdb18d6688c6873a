"""Safe retries with Idempotency-Key (issue 12, item 3).

A POST or PATCH with an Idempotency-Key is checked in reserve.lua's call
(the one the call makes anyway): the first call leaves an in-flight marker
in the account's slot (pg:{A}:idem:<sha256 of the key>) that expires with
its hold; its settle (settle.lua's call) stores its billable answer for
IDEMPOTENCY_TTL, or clears the marker when the call was not billable. A
retry with the same fingerprint (method, target, body hash) gets the stored
answer with Idempotent-Replayed: true, not proxied, cost 0; while the first
runs, 409; with another request, 422. Everything on the real stack: devsim
counts what reached the device API, Postgres what was charged.
"""
import hashlib
import json
import threading
import time

import harness
from harness import http

ROUTES = {
    "charge_on": ["2xx"],
    "routes": [
        {"id": "device.command", "method": "POST", "path": "/v1/devices/*/commands", "price": 5,
         "timeout_ms": 2000},
        {"id": "lock.unlock", "method": "POST", "path": "/v1/locks/*/unlock", "price": 5,
         "idempotency": "required"},
        {"id": "lamp.toggle", "method": "POST", "path": "/v1/lamps/*/toggle", "price": 1,
         "idempotency": "off"},
        {"id": "device.patch", "method": "PATCH", "path": "/v1/devices/*", "price": 2},
        {"id": "device.read", "method": "GET", "path": "/v1/devices/*", "price": 1},
    ],
}


def _base(stack):
    for p in getattr(stack, "idem_gateways", []):
        if p.alive():
            p.stop()
    stack.idem_gateways = []
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    http("POST", stack.devsim.url + "/_sim/reset")


def _gateway(stack, env=None, routes=ROUTES):
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(routes), "HOLD_GRACE_MS": "1000"}
    e.update(env or {})
    p = stack.spawn("gateway-idem", [stack.bin("gateway")], e, port)
    stack.idem_gateways.append(p)
    return p


def _sim_requests(stack):
    return http("GET", stack.devsim.url + "/_sim/stats").json()["requests"]


def _account(stack, points=1000):
    acct, key = stack.new_account(points)
    stack.wait_for(lambda: stack.hot(acct).get("credited") == points, timeout=15,
                   what="credit in redis")
    return acct, key


def _cmd(url, key, ikey=None, body=None, path="/v1/devices/d1/commands", method="POST",
         extra=None, timeout=30):
    h = {"X-Api-Key": key}
    if ikey is not None:
        h["Idempotency-Key"] = ikey
    h.update(extra or {})
    return http(method, url + path, {"op": "unlock"} if body is None else body, h,
                timeout=timeout)


def _marker(stack, acct, ikey):
    return f"pg:{{{acct}}}:idem:{hashlib.sha256(ikey.encode()).hexdigest()}"


def _charged(stack, acct):
    """(rows, points) of the account's commits in Postgres, once drained."""
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    rows = stack.psql(f"select count(*), coalesce(sum(amount), 0) from charges "
                      f"where account_id = {acct} and amount > 0")
    return int(rows[0][0]), int(rows[0][1])


def _metric(gw, result):
    text = http("GET", gw.ops_url + "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(f'pointgate_gateway_idempotency_total{{result="{result}"}}'):
            return int(float(line.split()[-1]))
    raise AssertionError(f"no idempotency metric {result}")


def test_sequential_retry_replays_status_headers_and_body_at_no_cost(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    r1 = _cmd(gw.url, key, "order-1")
    assert r1.status == 202, r1
    assert r1.headers["x-points-charged"] == "5"
    assert "idempotent-replayed" not in r1.headers
    first_id = r1.json()["command_id"]
    for ikey in ("order-1", '"order-1"'):  # the sf-string form is the same key
        r2 = _cmd(gw.url, key, ikey)
        assert r2.status == 202, r2
        assert r2.headers["idempotent-replayed"] == "true"
        assert r2.headers["x-points-charged"] == "0"
        assert r2.headers["x-points-remaining"] == "995"
        assert r2.headers["content-type"] == r1.headers["content-type"]
        assert r2.headers["x-request-id"] != r1.headers["x-request-id"]
        assert r2.body == r1.body and r2.json()["command_id"] == first_id
    assert _sim_requests(stack) == 1
    assert _charged(stack, acct) == (1, 5)
    v = stack.redis_raw("GET", _marker(stack, acct, "order-1"))
    assert v.startswith("d|"), v[:80]
    ttl = int(stack.redis_raw("PTTL", _marker(stack, acct, "order-1")))
    assert 86000 * 1000 < ttl <= 86400 * 1000, ttl  # IDEMPOTENCY_TTL, 24 h
    assert _metric(gw, "replayed") == 2 and _metric(gw, "stored") == 1
    # The key is the account's: another account's same key is a first call.
    acct2, key2 = _account(stack)
    r3 = _cmd(gw.url, key2, "order-1")
    assert r3.status == 202 and "idempotent-replayed" not in r3.headers
    assert r3.json()["command_id"] != first_id
    assert _sim_requests(stack) == 2


def test_same_key_with_another_request_is_422(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    assert _cmd(gw.url, key, "k-422").status == 202
    for kw in ({"body": {"op": "lock"}}, {"path": "/v1/devices/d2/commands"},
               {"path": "/v1/devices/d1/commands?x=1"},
               {"method": "PATCH", "path": "/v1/devices/d1"}):
        r = _cmd(gw.url, key, "k-422", **kw)
        assert r.status == 422, (kw, r)
        assert r.json()["error"] == "idempotency_key_reused"
        assert r.headers["x-points-charged"] == "0"
    assert _sim_requests(stack) == 1
    assert _charged(stack, acct) == (1, 5)
    assert _metric(gw, "reused") == 4


def test_failed_first_call_is_not_stored_and_the_retry_runs_anew(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    r = _cmd(gw.url, key, "k-5xx", extra={"X-Sim-Status": "503"})
    assert r.status == 503 and r.headers["x-points-charged"] == "0"
    assert stack.redis_raw("EXISTS", _marker(stack, acct, "k-5xx")) == "0"
    # A timeout is not billable either (route timeout 2 s).
    r = _cmd(gw.url, key, "k-5xx", extra={"X-Sim-Delay-Ms": "2500"})
    assert r.status == 504, r
    r = _cmd(gw.url, key, "k-5xx")
    assert r.status == 202 and "idempotent-replayed" not in r.headers
    r2 = _cmd(gw.url, key, "k-5xx")
    assert r2.status == 202 and r2.headers["idempotent-replayed"] == "true"
    assert r2.body == r.body
    assert _sim_requests(stack) == 3
    assert _charged(stack, acct) == (1, 5)
    assert _metric(gw, "cleared") == 2


def test_50_concurrent_calls_with_one_key_run_once(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack, 100000)  # plenty: leases would serve it without a key
    # A lease exists for the account already: keyed calls must not use it.
    for i in range(3):
        assert _cmd(gw.url, key, None).status == 202
    http("POST", stack.devsim.url + "/_sim/reset")
    out = [None] * 50
    go = threading.Event()

    def call(i):
        go.wait()
        out[i] = _cmd(gw.url, key, "k-50", extra={"X-Sim-Delay-Ms": "300"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    first = [r for r in out if r.status == 202 and "idempotent-replayed" not in r.headers]
    replays = [r for r in out if r.status == 202 and r.headers.get("idempotent-replayed")]
    conflicts = [r for r in out if r.status == 409]
    assert len(first) == 1, [(r.status, r.body[:80]) for r in out]
    assert len(first) + len(replays) + len(conflicts) == 50, [r.status for r in out]
    assert all(r.json()["error"] == "idempotency_in_flight" and r.headers["retry-after"] == "1"
               for r in conflicts)
    assert all(r.body == first[0].body for r in replays)
    assert all(r.headers["x-points-charged"] == "0" for r in replays + conflicts)
    assert _sim_requests(stack) == 1
    assert _charged(stack, acct) == (4, 20)  # the three plain calls and this one
    # once settled, every retry replays
    r = _cmd(gw.url, key, "k-50", extra={"X-Sim-Delay-Ms": "300"})
    assert r.headers.get("idempotent-replayed") == "true" and r.body == first[0].body


def test_route_options_required_off_and_methods(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    ok = {"X-Sim-Status": "200"}
    r = _cmd(gw.url, key, None, path="/v1/locks/front/unlock", extra=ok)
    assert r.status == 400 and r.json()["error"] == "idempotency_key_required", r
    assert _sim_requests(stack) == 0
    assert _cmd(gw.url, key, "u-1", path="/v1/locks/front/unlock", extra=ok).status == 200
    r = _cmd(gw.url, key, "u-1", path="/v1/locks/front/unlock", extra=ok)
    assert r.status == 200 and r.headers["idempotent-replayed"] == "true"
    assert _sim_requests(stack) == 1
    # off: the header is ignored (both run) and forwarded like any other
    for _ in range(2):
        r = _cmd(gw.url, key, "t-1", path="/v1/lamps/l1/toggle", extra=ok)
        assert r.status == 200 and "idempotent-replayed" not in r.headers
    assert _sim_requests(stack) == 3
    last = http("GET", stack.devsim.url + "/_sim/last").json()
    assert last["idempotency-key"] == "t-1"
    # optional (the default) without a key: plain calls, each runs
    for _ in range(2):
        assert _cmd(gw.url, key, None).status == 202
    assert _sim_requests(stack) == 5
    # PATCH is covered; GET is not (it is idempotent already): the key is ignored
    for _ in range(2):
        r = _cmd(gw.url, key, "p-1", method="PATCH", path="/v1/devices/d1", extra=ok)
    assert r.status == 200 and r.headers["idempotent-replayed"] == "true"
    for _ in range(2):
        r = http("GET", gw.url + "/v1/devices/d1", headers={"X-Api-Key": key,
                                                          "Idempotency-Key": "g-1"})
        assert r.status == 200 and "idempotent-replayed" not in r.headers
    assert _sim_requests(stack) == 8


def test_bad_keys_are_400_and_change_nothing(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    for bad in ("x" * 256, '""', '"unterminated', '"a"b', '"\\n"'):
        r = _cmd(gw.url, key, bad)
        assert r.status == 400 and r.json()["error"] == "bad_idempotency_key", (bad, r)
    assert _cmd(gw.url, key, "y" * 255).status == 202
    assert _cmd(gw.url, key, '"with space \\" and quote"').status == 202
    # two headers, an empty value, a non-ASCII byte: raw requests
    body = b'{"op":"unlock"}'
    for hdr in (b"Idempotency-Key: a\r\nIdempotency-Key: a\r\n", b"Idempotency-Key: \r\n",
                b"Idempotency-Key: caf\xc3\xa9\r\n"):
        raw = (b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " +
               key.encode() + b"\r\n" + hdr + b"Content-Length: %d\r\nConnection: close\r\n\r\n"
               % len(body) + body)
        out = harness.raw_http(gw.port, raw)
        assert out.startswith(b"HTTP/1.1 400") and b"bad_idempotency_key" in out, (hdr, out)
    assert _sim_requests(stack) == 2
    # a missing key is checked before the body is read: 401 first
    r = http("POST", gw.url + "/v1/devices/d1/commands", {"op": "unlock"},
             {"Idempotency-Key": "x" * 300})
    assert r.status == 401


def test_answer_over_max_body_is_not_replayed_nor_run_again(stack):
    _base(stack)
    gw = _gateway(stack, {"IDEMPOTENCY_MAX_BODY": "1000"})
    acct, key = _account(stack)
    big = {"X-Sim-Body-Bytes": "5000", "X-Sim-Status": "200"}
    r = _cmd(gw.url, key, "k-big", extra=big)
    assert r.status == 200 and len(r.body) == 5000 and r.headers["x-points-charged"] == "5"
    r2 = _cmd(gw.url, key, "k-big", extra=big)
    assert r2.status == 409, r2
    assert r2.json()["error"] == "idempotency_response_too_large"
    assert r2.json()["status"] == 200 and r2.headers["x-points-charged"] == "0"
    assert _sim_requests(stack) == 1
    assert _charged(stack, acct) == (1, 5)
    # within the bound, stored and replayed whole
    small = {"X-Sim-Body-Bytes": "1000", "X-Sim-Status": "200"}
    r = _cmd(gw.url, key, "k-small", extra=small)
    r2 = _cmd(gw.url, key, "k-small", extra=small)
    assert r2.headers["idempotent-replayed"] == "true" and r2.body == r.body
    assert _metric(gw, "stored_without_answer") == 1 and _metric(gw, "not_kept") == 1


def test_gateway_killed_mid_call_leaves_a_marker_that_expires_with_the_hold(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    slow = {"X-Sim-Delay-Ms": "1800"}
    errors = []

    def call():
        try:
            _cmd(gw.url, key, "k-crash", extra=slow, timeout=10)
        except Exception as e:  # noqa: BLE001 - the gateway dies under it
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    mk = _marker(stack, acct, "k-crash")
    stack.wait_for(lambda: stack.redis_raw("GET", mk).startswith("f|"), what="in-flight marker")
    # deadline: the route's timeout (2 s) + HOLD_GRACE_MS (1 s)
    ttl = int(stack.redis_raw("PTTL", mk))
    assert 2000 < ttl <= 3000, ttl
    gw.kill9()
    t.join()
    assert errors
    gw2 = _gateway(stack)
    r = _cmd(gw2.url, key, "k-crash", extra=slow)
    assert r.status == 409 and r.json()["error"] == "idempotency_in_flight", r
    stack.wait_for(lambda: stack.redis_raw("EXISTS", mk) == "0", timeout=10,
                   what="marker expired")
    r = _cmd(gw2.url, key, "k-crash")
    assert r.status == 202 and "idempotent-replayed" not in r.headers, r
    assert _sim_requests(stack) == 2  # the killed call reached the device, and the retry
    # the killed call's hold is swept at cost 0; the retry is charged once
    stack.wait_for(lambda: stack.hot(acct).get("held") == 0, timeout=15, what="hold swept")
    assert _charged(stack, acct) == (1, 5)


def test_replay_survives_a_redis_restart_with_aof(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    r1 = _cmd(gw.url, key, "k-aof")
    assert r1.status == 202
    assert stack.redis_raw("CONFIG", "GET", "appendonly").splitlines()[-1] == "yes"
    stack.service("redis-stop")
    stack.service("redis-start")
    stack.wait_for(lambda: _cmd(gw.url, key, None).status == 202, timeout=20,
                   what="gateway serving after the restart")
    # Each worker reconnects on its own: a 503 from one still reconnecting
    # changes nothing (no marker is touched), so the retry is retried.
    r2 = stack.wait_for(lambda: (lambda r: r if r.status != 503 else None)(
        _cmd(gw.url, key, "k-aof")), timeout=20, what="an answer other than 503")
    assert r2.status == 202 and r2.headers["idempotent-replayed"] == "true", r2
    assert r2.body == r1.body


def test_settle_delivered_late_keeps_the_call_from_running_again(stack):
    """Redis goes away while the first call is at the device: its answer goes
    out, its settle is queued and resent when Redis is back (as `late`),
    without the answer (no longer in memory): a retry gets 409
    idempotency_response_unavailable, never a second run."""
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    res = []
    t = threading.Thread(target=lambda: res.append(
        _cmd(gw.url, key, "k-late", extra={"X-Sim-Delay-Ms": "1500"})))
    t.start()
    mk = _marker(stack, acct, "k-late")
    stack.wait_for(lambda: stack.redis_raw("GET", mk).startswith("f|"), what="in-flight marker")
    stack.service("redis-stop")
    t.join()
    assert res[0].status == 202 and res[0].headers["x-points-charged"] == "5", res
    stack.service("redis-start")
    stack.wait_for(lambda: stack.redis_raw("GET", mk).startswith("n|"), timeout=20,
                   what="the late settle's marker")
    r = _cmd(gw.url, key, "k-late")
    assert r.status == 409 and r.json()["error"] == "idempotency_response_unavailable", r
    assert r.json()["status"] == 202
    assert _sim_requests(stack) == 1
    assert _charged(stack, acct) == (1, 5)


def test_two_gateways_share_markers(stack):
    _base(stack)
    gw1 = _gateway(stack)
    gw2 = _gateway(stack)
    acct, key = _account(stack)
    res = []
    t = threading.Thread(target=lambda: res.append(
        _cmd(gw1.url, key, "k-two", extra={"X-Sim-Delay-Ms": "800"})))
    t.start()
    stack.wait_for(lambda: stack.redis_raw("GET", _marker(stack, acct, "k-two")).startswith("f|"),
                   what="in-flight marker")
    r = _cmd(gw2.url, key, "k-two")
    assert r.status == 409, r
    t.join()
    r = _cmd(gw2.url, key, "k-two")
    assert r.status == 202 and r.headers["idempotent-replayed"] == "true"
    assert r.body == res[0].body
    assert _sim_requests(stack) == 1
    assert _charged(stack, acct) == (1, 5)


def test_account_budget_bounds_the_stored_answers(stack):
    _base(stack)
    gw = _gateway(stack, {"IDEMPOTENCY_ACCOUNT_BYTES": "4096"})
    acct, key = _account(stack)
    big = {"X-Sim-Body-Bytes": "1500", "X-Sim-Status": "200"}
    stored = 0
    while True:
        r = _cmd(gw.url, key, f"b-{stored}", extra=big)
        if r.status != 200:
            break
        stored += 1
        assert stored < 10
    assert stored == 3, stored  # 3 x ~1.8 KiB reach 4 KiB; the 4th new key is refused
    assert r.status == 429 and r.json()["error"] == "idempotency_budget_exceeded", r
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-points-charged"] == "0"
    # stored answers still replay; calls without a key still run
    r = _cmd(gw.url, key, "b-0", extra=big)
    assert r.status == 200 and r.headers["idempotent-replayed"] == "true"
    assert _cmd(gw.url, key, None, extra=big).status == 200
    assert _sim_requests(stack) == 4
    used = stack.redis_raw("HGETALL", f"pg:{{{acct}}}:idemb").splitlines()
    assert sum(int(x) for x in used[1::2]) >= 4096
    assert _metric(gw, "budget_exceeded") == 1


def test_body_sent_after_100_continue_is_read_before_the_reserve(stack):
    """A call with a key whose body is not there with its head is not
    reserved first (request_early): its fingerprint needs the body, so the
    gateway sends 100 Continue at once, reads the body, then reserves."""
    import socket
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    body = b'{"op":"unlock"}'
    outs = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        s.sendall(b"POST /v1/devices/d9/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " +
                  key.encode() + b"\r\nIdempotency-Key: k-continue\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        assert stack.hot(acct).get("held", 0) == 0  # nothing held before the body
        s.sendall(body)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
        s.close()
        outs.append(out)
    assert outs[0].startswith(b"HTTP/1.1 202") and b"Idempotent-Replayed" not in outs[0], outs[0]
    assert outs[1].startswith(b"HTTP/1.1 202") and b"Idempotent-Replayed: true" in outs[1]
    assert outs[0].split(b"\r\n\r\n", 1)[1] == outs[1].split(b"\r\n\r\n", 1)[1]
    assert _sim_requests(stack) == 1
    # A made-up key is refused before any body byte: no 100 Continue, a 401
    # at once, though the body (1 MiB announced) never comes.
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"POST /v1/devices/d9/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: pgk_" +
              b"A" * 43 + b"\r\nIdempotency-Key: k-bad\r\nExpect: 100-continue\r\n"
              b"Content-Length: 1048576\r\n\r\n")
    first = s.recv(4096)
    s.close()
    assert first.startswith(b"HTTP/1.1 401"), first[:200]
    assert b"100 Continue" not in first


def test_spilled_settles_store_or_clear_their_markers(stack):
    """A spill file's settle line carries the key's hash and fingerprint: a
    commit replayed late stores the marker of an answer not kept (a retry
    gets 409, never a second run), a release clears the in-flight marker
    (a retry runs anew). Lines of older files, without them, still replay."""
    import os
    _base(stack)
    acct, key = _account(stack)
    spill = os.path.join(stack.dir, "spill-idem")
    os.makedirs(spill, exist_ok=True)
    fp = hashlib.sha256(b"whatever the first call was").hexdigest()
    deadline = int(time.time() * 1000) + 60000
    lines = []
    for rid, ikey, outcome in (("a1" * 16, "k-spill-commit", "late"),
                               ("b2" * 16, "k-spill-release", "release"),
                               ("c3" * 16, None, "late")):
        stack.redis("HSET", f"pg:{{{acct}}}:holds", rid, f"5|device.command|{deadline}")
        stack.redis("HINCRBY", f"pg:{{{acct}}}:acct", "held", 5)
        if ikey:
            stack.redis("SET", _marker(stack, acct, ikey), f"f|{fp}|{rid}|{deadline}", "PX", 60000)
            kh = hashlib.sha256(ikey.encode()).hexdigest()
            lines.append(f"S {rid} {acct} 5 {outcome} 202 {kh} {fp}\n")
        else:
            lines.append(f"S {rid} {acct} 5 {outcome} 202\n")
    path = os.path.join(spill, "spill-1-0-2.log")
    with open(path, "w") as f:
        f.write("".join(lines))
    gw = _gateway(stack, {"GATEWAY_SPILL_DIR": spill})
    stack.wait_for(lambda: not os.path.exists(path), timeout=20, what="replayed and deleted")
    v = stack.redis_raw("GET", _marker(stack, acct, "k-spill-commit"))
    assert v == f"n|{fp}|{'a1' * 16}|202|l", v
    assert stack.redis_raw("EXISTS", _marker(stack, acct, "k-spill-release")) == "0"
    assert stack.hot(acct)["held"] == 0
    assert _charged(stack, acct) == (2, 10)
    gw.stop()


def test_a_resent_settle_never_overwrites_a_stored_answer(stack):
    """The settle's reply was lost and the gateway resends it without the
    answer (a bare "n|" marker, or a clear): the stored answer stays, and
    the budget is not counted twice."""
    import luahelp
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack)
    r1 = _cmd(gw.url, key, "resend-1")
    assert r1.status == 202, r1
    mkey = _marker(stack, acct, "resend-1")
    stored = stack.redis_raw("GET", mkey)
    assert stored.startswith("d|"), stored[:80]
    kind, fp, rid = stored.split("|")[:3]
    budget = stack.redis_raw("HGETALL", f"pg:{{{acct}}}:idemb")
    red = luahelp.redis_for(stack)
    kh = hashlib.sha256(b"resend-1").hexdigest()
    for marker in (f"n|{fp}|{rid}|202|l", ""):
        keys = [luahelp.OUTBOX, luahelp.acct_key(acct), luahelp.holds_key(acct)]
        args = [rid, 5, "commit", 202, acct, kh, marker, 86400000]
        out = red.call("EVALSHA", red.sha("settle"), len(keys), *keys, *args)
        assert out[0] == 0, out  # the hold is gone: no charge either
        assert stack.redis_raw("GET", mkey) == stored
    assert stack.redis_raw("HGETALL", f"pg:{{{acct}}}:idemb") == budget
    r2 = _cmd(gw.url, key, "resend-1")
    assert r2.headers.get("idempotent-replayed") == "true" and r2.body == r1.body, r2
    assert _charged(stack, acct) == (1, 5)
