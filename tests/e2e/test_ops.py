"""The gateway's ops listener (issue 11, item 1): /metrics in Prometheus's
text format (checked by promtool), /healthz, /readyz, and the stop order
(readiness turns 503 while calls are still served, before the drain).

The ops port is never the public one: the public listener answers /metrics
like any unknown path, and the metrics never name an account or a key.
"""
import re
import signal
import socket
import subprocess
import time

import harness
from harness import http

LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
ALLOWED_LABELS = {"route", "method", "status_class", "outcome", "state", "sink", "program",
                  "version", "le", "result"}
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def _setup(stack):
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    if stack.gateway is None or not stack.gateway.alive():
        stack.start_gateway(env={"GATEWAY_THREADS": "2"})
    return stack.gateway


def _metrics(ops_url):
    r = http("GET", ops_url + "/metrics")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/plain; version=0.0.4"), r.headers
    return r.body.decode()


def _samples(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_promtool_and_counts(stack):
    gw = _setup(stack)
    stack.wait_for(lambda: http("GET", gw.ops_url + "/readyz").status == 200, timeout=10,
                   what="ready")
    acct, key = stack.new_account(points=10)
    before = _samples(_metrics(gw.ops_url))
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        assert http("GET", gw.url + "/v1/devices/d1", headers=auth).status == 200
    assert http("GET", gw.url + "/v1/devices/d1").status == 401
    assert http("GET", gw.url + "/nowhere", headers=auth).status == 404
    r = http("GET", gw.url + "/v1/devices/d1", headers=dict(auth, **{"X-Sim-Status": "503"}))
    assert r.status == 503, r
    text = _metrics(gw.ops_url)
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    after = _samples(text)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    # Counted by both workers, merged at scrape time.
    assert delta('pointgate_gateway_responses_total{status_class="2xx"}') == 3
    assert delta('pointgate_gateway_responses_total{status_class="4xx"}') == 2
    assert delta('pointgate_gateway_responses_total{status_class="5xx"}') == 1
    assert after['pointgate_build_info{program="gateway",version="dev"}'] == 1
    assert after["pointgate_gateway_ready"] == 1 and after["pointgate_gateway_draining"] == 0
    assert after["pointgate_gateway_redis_up"] == 1
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert after.get(name, 0) > 0, name
    assert abs(after["process_start_time_seconds"] - time.time()) < 600
    # Bounded labels: no account id, no key, no key hash in the text. Only
    # these label names exist, and no value but a bucket bound is the
    # account's id (a small number: `le="5"` may be one).
    assert key not in text and key[4:20] not in text
    for name in after:
        for lname, lval in LABEL.findall(name):
            assert lname in ALLOWED_LABELS, name
            assert lname == "le" or lval != str(acct), name


def test_public_listener_serves_no_metrics(stack):
    gw = _setup(stack)
    for path in ("/metrics", "/healthz", "/readyz"):
        r = http("GET", gw.url + path)
        assert r.status in (401, 404), (path, r)
        assert b"pointgate_" not in r.body and b"process_" not in r.body


def test_healthz_readyz_and_unknown_paths(stack):
    gw = _setup(stack)
    # Ready once every worker saw Redis answer (published every 250 ms).
    stack.wait_for(lambda: http("GET", gw.ops_url + "/readyz").status == 200, timeout=10,
                   what="ready")
    r = http("GET", gw.ops_url + "/healthz")
    assert r.status == 200 and r.json() == {"status": "ok"}, r
    r = http("GET", gw.ops_url + "/readyz")
    assert r.status == 200 and r.json() == {"status": "ready"}, r
    r = http("GET", gw.ops_url + "/other")
    assert r.status == 404 and r.json()["error"]["code"] == "not_found", r
    r = http("POST", gw.ops_url + "/metrics", body=b"x")
    assert r.status == 405, r


def test_readyz_follows_redis(stack):
    gw = _setup(stack)
    stack.service("redis-stop")
    try:
        def not_ready():
            r = http("GET", gw.ops_url + "/readyz")
            return r.status == 503 and "redis" in r.json()["reasons"]
        stack.wait_for(not_ready, timeout=10, what="/readyz 503 redis")
        assert http("GET", gw.ops_url + "/healthz").status == 200  # alive, just not ready
        assert _samples(_metrics(gw.ops_url))["pointgate_gateway_redis_up"] == 0
    finally:
        stack.service("redis-start")
    stack.wait_for(lambda: http("GET", gw.ops_url + "/readyz").status == 200, timeout=20,
                   what="/readyz 200 again")


def test_stop_turns_readyz_first(stack):
    """SIGTERM: /readyz says draining at once while calls are still served
    for GATEWAY_STOP_DELAY_MS; then the gateway drains and exits 0."""
    _setup(stack)
    acct, key = stack.new_account(points=10)
    g = stack.start_gateway(env={"GATEWAY_STOP_DELAY_MS": "1500"})
    auth = {"Authorization": f"Bearer {key}"}
    stack.wait_for(lambda: http("GET", g.ops_url + "/readyz").status == 200, timeout=10,
                   what="ready")
    g.signal(signal.SIGTERM)
    t0 = time.time()

    # "At once": the signal reaches the worker loops through their event
    # loop, so a /readyz sent the same microsecond may still say ready.
    def draining():
        r = http("GET", g.ops_url + "/readyz")
        return r.status == 503 and r.json()["reasons"] == ["draining"]
    stack.wait_for(draining, timeout=0.5, what="/readyz 503 draining")
    assert _samples(_metrics(g.ops_url))["pointgate_gateway_draining"] == 1
    assert http("GET", g.url + "/v1/devices/d1", headers=auth).status == 200
    assert time.time() - t0 < 1.2, "the call must be served inside the stop delay"
    assert g.p.wait(timeout=30) == 0


def test_ops_port_taken_is_a_start_error(stack):
    gw = _setup(stack)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        env = dict(stack.env, **stack.gateway_env(), UPSTREAM_URL=stack.devsim.url,
                   GATEWAY_LISTEN=f"127.0.0.1:{harness.free_port()}",
                   ROUTES_FILE=stack.write_routes(harness.DEFAULT_ROUTES),
                   GATEWAY_OPS_LISTEN="127.0.0.1:%d" % held.getsockname()[1])
        p = subprocess.run([stack.bin("gateway")], env=env, capture_output=True, text=True,
                           timeout=60)
    finally:
        held.close()
    assert p.returncode != 0
    assert "GATEWAY_OPS_LISTEN" in p.stderr, p.stderr


def _sum(samples, family, **labels):
    """The sum of FAMILY's samples whose labels include LABELS."""
    t = 0.0
    for name, v in samples.items():
        base = name.split("{", 1)[0]
        if base != family:
            continue
        have = dict(LABEL.findall(name))
        if all(have.get(k) == val for k, val in labels.items()):
            t += v
    return t


def test_metrics_outcomes_points_and_histograms(stack):
    """Every billing outcome lands in requests_total with its route, method
    and status class; points charged and released by route; the three
    latency histograms count the calls they time; the waiter gauge and
    the hold-wait histogram see a call that waited for held points."""
    gw = _setup(stack)
    stack.wait_for(lambda: http("GET", gw.ops_url + "/readyz").status == 200, timeout=10,
                   what="ready")
    acct, key = stack.new_account(points=200)
    _, poor = stack.new_account(points=0)
    auth = {"Authorization": f"Bearer {key}"}
    before = _samples(_metrics(gw.ops_url))
    for _ in range(3):
        assert http("GET", gw.url + "/v1/devices/d1", headers=auth).status == 200
    r = http("POST", gw.url + "/v1/devices/d1/commands", body=b'{"cmd":"lock"}',
             headers=dict(auth, **{"Content-Type": "application/json"}))
    assert r.status == 202, r
    r = http("POST", gw.url + "/v1/batch", body=b'{"items":[{"id":1},{"id":2},{"id":3}]}',
             headers=auth)
    assert r.status == 200 and r.headers.get("x-points-charged") == "6", r
    r = http("GET", gw.url + "/v1/devices/d1", headers=dict(auth, **{"X-Sim-Status": "500"}))
    assert r.status == 500 and r.headers.get("x-points-charged") == "0", r
    assert http("GET", gw.url + "/v1/devices/d1", headers=harness.auth(poor)).status == 402
    assert http("GET", gw.url + "/v1/devices/d1").status == 401
    assert http("GET", gw.url + "/nowhere", headers=auth).status == 404
    assert http("GET", gw.url + "/_billing/balance", headers=auth).status == 200
    text = _metrics(gw.ops_url)
    after = _samples(text)

    def d(family, **labels):
        return _sum(after, family, **labels) - _sum(before, family, **labels)

    req = "pointgate_gateway_requests_total"
    assert d(req, route="device.read", method="GET", status_class="2xx", outcome="charged") == 3
    assert d(req, route="device.command", method="POST", status_class="2xx",
             outcome="charged") == 1
    assert d(req, route="device.batch", method="POST", outcome="charged") == 1
    assert d(req, route="device.read", status_class="5xx", outcome="released") == 1
    assert d(req, route="device.read", status_class="4xx", outcome="refused") == 1
    assert d(req, outcome="unauthorized", status_class="4xx") == 1
    assert d(req, route="_none", outcome="no_route", status_class="4xx") == 1
    assert d(req, route="_billing", outcome="info", status_class="2xx") == 1
    assert d(req) == 10
    # Points by route: 3 x 1 and 5 charged; the batch held 100, charged 6,
    # released 94; the failed read released its 1.
    assert d("pointgate_gateway_points_charged_total", route="device.read") == 3
    assert d("pointgate_gateway_points_charged_total", route="device.command") == 5
    assert d("pointgate_gateway_points_charged_total", route="device.batch") == 6
    assert d("pointgate_gateway_points_released_total", route="device.batch") == 94
    assert d("pointgate_gateway_points_released_total", route="device.read") == 1
    # Every call is timed; the upstream only for the 6 that reached it.
    assert d("pointgate_gateway_request_duration_seconds_count") == 10
    assert d("pointgate_gateway_upstream_duration_seconds_count") == 6
    assert d("pointgate_gateway_request_duration_seconds_bucket", le="+Inf") == 10
    assert d("pointgate_gateway_received_bytes_total") > 0
    assert d("pointgate_gateway_sent_bytes_total") > 0
    # Redis's figures come with the workers' beat (every 250 ms).
    rt0 = _sum(before, "pointgate_gateway_redis_round_trips_total")
    stack.wait_for(lambda: _sum(_samples(_metrics(gw.ops_url)),
                                "pointgate_gateway_redis_round_trips_total") - rt0 >= 6,
                   timeout=5, what="Redis round trips counted")
    assert after["pointgate_gateway_calls_in_flight"] == 0
    stack.wait_for(lambda: _samples(_metrics(gw.ops_url))[
        'pointgate_gateway_upstream_connections{state="idle"}'] >= 1, timeout=5,
        what="an idle upstream connection")
    assert after["pointgate_gateway_client_connections_accepted_total"] > 0

    # A call short while its points are held by a slow call waits; the slow
    # call fails (its point comes back) and the waiter gets it.
    _, tight = stack.new_account(points=1)
    base = _samples(_metrics(gw.ops_url))
    res = {}

    def slow():
        res["slow"] = http("GET", gw.url + "/v1/devices/d1",
                           headers=dict(harness.auth(tight),
                                        **{"X-Sim-Delay-Ms": "800", "X-Sim-Status": "503"}))

    import threading
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    t2 = threading.Thread(target=lambda: res.update(
        waiter=http("GET", gw.url + "/v1/devices/d1", headers=harness.auth(tight))))
    t2.start()
    stack.wait_for(lambda: _samples(_metrics(gw.ops_url))["pointgate_gateway_waiting_calls"] == 1,
                   timeout=5, what="one waiting call")
    t.join()
    t2.join()
    assert res["slow"].status == 503 and res["waiter"].status == 200, res
    end = _samples(_metrics(gw.ops_url))
    assert end["pointgate_gateway_waiting_calls"] == 0
    assert (_sum(end, "pointgate_gateway_hold_wait_seconds_count") -
            _sum(base, "pointgate_gateway_hold_wait_seconds_count")) == 1
    waited = (_sum(end, "pointgate_gateway_hold_wait_seconds_sum") -
              _sum(base, "pointgate_gateway_hold_wait_seconds_sum"))
    assert 0.2 < waited < 5, waited


def test_metrics_upstream_failures(stack):
    """Connect failures and timeouts are counted, and the calls released."""
    main = _setup(stack)
    acct, key = stack.new_account(points=10)
    routes = dict(harness.DEFAULT_ROUTES)
    routes["routes"] = harness.DEFAULT_ROUTES["routes"] + [
        {"id": "device.slow", "method": "GET", "path": "/v1/slow/*", "price": 2,
         "timeout_ms": 300}]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    port = dead.getsockname()[1]
    try:
        down = stack.start_gateway(upstream=f"http://127.0.0.1:{port}")
        slow = stack.start_gateway(routes=routes)
    finally:
        stack.gateway = main
    try:
        stack.wait_for(lambda: http("GET", down.ops_url + "/readyz").status == 200, timeout=10,
                       what="ready")
        r = http("GET", down.url + "/v1/devices/d1", headers=harness.auth(key))
        assert r.status == 502 and r.headers.get("x-points-charged") == "0", r
        # The proxy's figures reach the metrics with the worker's beat (250 ms).
        stack.wait_for(lambda: _samples(_metrics(down.ops_url))[
            "pointgate_gateway_upstream_connect_failures_total"] >= 1, timeout=5,
            what="a connect failure counted")
        s = _samples(_metrics(down.ops_url))
        assert _sum(s, "pointgate_gateway_requests_total", route="device.read",
                    status_class="5xx", outcome="released") == 1
        assert _sum(s, "pointgate_gateway_points_released_total", route="device.read") == 1

        r = http("GET", slow.url + "/v1/slow/x", headers=dict(harness.auth(key),
                                                               **{"X-Sim-Delay-Ms": "2000"}))
        assert r.status == 504 and r.headers.get("x-points-charged") == "0", r
        stack.wait_for(lambda: _samples(_metrics(slow.ops_url))[
            "pointgate_gateway_upstream_timeouts_total"] == 1, timeout=5,
            what="a timeout counted")
        s = _samples(_metrics(slow.ops_url))
        assert _sum(s, "pointgate_gateway_requests_total", route="device.slow",
                    outcome="released") == 1
        assert _sum(s, "pointgate_gateway_upstream_duration_seconds_sum") >= 0.25, \
            [x for x in s.items() if "upstream_duration" in x[0]]
    finally:
        down.stop()
        slow.stop()
        dead.close()


def test_metrics_backlog_refusing(stack):
    """The settlement backlog the workers poll, and their refusal at
    OUTBOX_MAX_BACKLOG, show in the gauges (and in the outcome)."""
    main = _setup(stack)
    try:
        gw = stack.start_gateway(env={"GATEWAY_THREADS": "2", "OUTBOX_MAX_BACKLOG": "1000"})
    finally:
        stack.gateway = main
    _, key = stack.new_account(points=10)
    try:
        stack.wait_for(lambda: http("GET", gw.ops_url + "/readyz").status == 200, timeout=10,
                       what="ready")
        s = _samples(_metrics(gw.ops_url))
        assert s["pointgate_gateway_refusing"] == 0
        # Records answered but not in Postgres: pg:backlog counts them
        # (raised here by hand, lowered again below).
        stack.redis("INCRBY", "pg:backlog", 5000)
        try:
            stack.wait_for(lambda: _samples(_metrics(gw.ops_url))[
                "pointgate_gateway_refusing"] == 2, timeout=5, what="both workers refusing")
            s = _samples(_metrics(gw.ops_url))
            assert s["pointgate_gateway_outbox_backlog_records"] >= 5000
            r = http("GET", gw.url + "/v1/devices/d1", headers=harness.auth(key))
            assert r.status == 503, r
            s = _samples(_metrics(gw.ops_url))
            assert _sum(s, "pointgate_gateway_requests_total", route="device.read",
                        outcome="billing_unavailable") == 1
        finally:
            stack.redis("DECRBY", "pg:backlog", 5000)
        stack.wait_for(lambda: _samples(_metrics(gw.ops_url))["pointgate_gateway_refusing"] == 0,
                       timeout=5, what="refusing no more")
    finally:
        gw.stop()
