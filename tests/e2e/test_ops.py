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

METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def _setup(stack):
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
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
    # Bounded labels: no account id, no key, no key hash in the text.
    assert key not in text and key[4:20] not in text
    assert not re.search(rf'="{acct}"', text)


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
    r = http("GET", g.ops_url + "/readyz")
    t0 = time.time()
    assert r.status == 503 and r.json()["reasons"] == ["draining"], r
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
