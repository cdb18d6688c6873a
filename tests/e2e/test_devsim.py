"""bin/devsim, the device control API simulator: endpoints, control headers,
control endpoints, limits, concurrency and clean shutdown.

The simulator is what every gateway test stands on, so its contract is pinned
here: each X-Sim-* header, /_sim/last, /_sim/stats, /_sim/reset.
"""
import concurrent.futures
import http.client as httpclient
import json
import socket
import time

import harness
from harness import http, raw_http

# harness.http() looks up `http.client` through its own name, which the
# function shadows; until harness.py is fixed, give it what it looks for
# (the same guard as luahelp.py, so this module does not depend on import order).
if not hasattr(harness.http, "client"):
    harness.http.client = httpclient


def _sim(stack):
    if stack.devsim is None or not stack.devsim.alive():
        stack.start_devsim()
    http("POST", stack.devsim.url + "/_sim/reset")
    return stack.devsim.url


def _idle(stack, url):
    """Waits for in_flight to reach 0: a request leaves it once its answer is
    fully written, which the client may see a moment before."""
    stack.wait_for(lambda: http("GET", url + "/_sim/stats").json()["in_flight"] == 0,
                   timeout=10, what="in_flight == 0")


def test_device_read(stack):
    url = _sim(stack)
    r = http("GET", url + "/v1/devices/thermo-1?verbose=1", headers={"X-Request-Id": "abc"})
    assert r.status == 200, r
    assert r.headers["content-type"] == "application/json"
    d = r.json()
    assert d["id"] == "thermo-1"
    assert d["kind"] in ("thermometer", "lock", "camera")
    assert isinstance(d["state"], dict) and d["state"]
    assert d["method"] == "GET"
    assert d["path"] == "/v1/devices/thermo-1"
    assert d["query"] == {"verbose": "1"}
    assert d["headers"]["x-request-id"] == "abc"
    assert d["body_length"] == 0
    assert "x-usage-units" not in r.headers
    # The kind is a function of the id, and the ids spread over the kinds.
    assert http("GET", url + "/v1/devices/thermo-1").json()["kind"] == d["kind"]
    kinds = {http("GET", url + f"/v1/devices/dev-{i}").json()["kind"] for i in range(30)}
    assert kinds == {"thermometer", "lock", "camera"}


def test_device_command(stack):
    url = _sim(stack)
    body = {"command": "unlock", "ttl": 30}
    r1 = http("POST", url + "/v1/devices/lock-1/commands", body)
    r2 = http("POST", url + "/v1/devices/lock-1/commands", body)
    assert r1.status == 202 and r2.status == 202, (r1, r2)
    d1, d2 = r1.json(), r2.json()
    assert d1["device_id"] == "lock-1"
    assert d1["command_id"] and d1["command_id"] != d2["command_id"]
    assert d1["body_length"] == len(json.dumps(body))
    assert d1["headers"]["content-type"] == "application/json"


def test_batch_counts_items(stack):
    url = _sim(stack)
    r = http("POST", url + "/v1/batch", {"items": [{"id": i} for i in range(7)]})
    assert r.status == 200, r
    assert r.json()["items"] == 7
    assert r.headers["x-usage-units"] == "7"
    r = http("POST", url + "/v1/batch", {"items": []})
    assert r.status == 200 and r.headers["x-usage-units"] == "0", r
    for bad in (b"not json", b'{"items": 3}', b""):
        r = http("POST", url + "/v1/batch", bad)
        assert r.status == 400, (bad, r)
        assert r.json()["error"] == "bad_request"


def test_sim_status(stack):
    url = _sim(stack)
    for status in (200, 201, 302, 400, 404, 429, 500, 502, 503, 599):
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Status": str(status)})
        assert r.status == status, (status, r)
        assert r.json()["id"] == "d1"
    r = http("POST", url + "/v1/devices/d1/commands", {}, headers={"X-Sim-Status": "500"})
    assert r.status == 500 and r.json()["command_id"], r
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Status": "204"})
    assert r.status == 204 and r.body == b"", r
    for bad in ("99", "600", "abc", "", "200x"):
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Status": bad})
        assert r.status == 400, (bad, r)
        assert r.json()["error"] == "bad_sim_header"


def test_sim_usage(stack):
    url = _sim(stack)
    r = http("POST", url + "/v1/batch", {"items": [1, 2, 3]}, headers={"X-Sim-Usage": "42"})
    assert r.status == 200 and r.headers["x-usage-units"] == "42", r
    # Verbatim, even nonsense: the gateway is the one that must cope with it.
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Usage": "-5"})
    assert r.status == 200 and r.headers["x-usage-units"] == "-5", r
    r = http("POST", url + "/v1/batch", {"items": [1]},
             headers={"X-Sim-Usage": "9", "X-Sim-Status": "503"})
    assert r.status == 503 and r.headers["x-usage-units"] == "9", r


def test_sim_delay(stack):
    url = _sim(stack)
    t0 = time.monotonic()
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Delay-Ms": "400"})
    took = time.monotonic() - t0
    assert r.status == 200, r
    assert 0.39 <= took < 5, took
    for bad in ("-1", "60001", "soon"):
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Delay-Ms": bad})
        assert r.status == 400 and r.json()["error"] == "bad_sim_header", (bad, r)
    # A client that gives up does not break the simulator.
    try:
        http("GET", url + "/v1/devices/d1", headers={"X-Sim-Delay-Ms": "2000"}, timeout=0.2)
        raise AssertionError("expected a client timeout")
    except (socket.timeout, TimeoutError):
        pass
    assert http("GET", url + "/v1/devices/d1").status == 200
    _idle(stack, url)  # the abandoned request still runs its course


def test_sim_body_bytes(stack):
    url = _sim(stack)
    for n in (0, 1, 1000, 65536, 65537, 8 << 20):
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Body-Bytes": str(n)})
        assert r.status == 200, (n, r.status)
        assert len(r.body) == n, (n, len(r.body))
        assert int(r.headers["content-length"]) == n
    r = http("GET", url + "/v1/devices/d1",
             headers={"X-Sim-Body-Bytes": "10", "X-Sim-Status": "502", "X-Sim-Usage": "3"})
    assert r.status == 502 and r.body == b"x" * 10 and r.headers["x-usage-units"] == "3", r
    for bad in (str((64 << 20) + 1), "-1", "1k"):
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Body-Bytes": bad})
        assert r.status == 400 and r.json()["error"] == "bad_sim_header", (bad, r)


def test_sim_drop(stack):
    url = _sim(stack)
    try:
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop": "1"})
        raise AssertionError(f"expected no answer, got {r}")
    except (httpclient.RemoteDisconnected, ConnectionResetError, httpclient.BadStatusLine):
        pass
    # At the socket level: the connection ends with no byte of an answer.
    out = raw_http(stack.devsim.port,
               b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nX-Sim-Drop: 1\r\nX-Sim-Delay-Ms: 100\r\n"
               b"Content-Length: 12\r\n\r\n{\"items\":[]}")
    assert out == b"", out
    assert http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop": "0"}).status == 200
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop": "yes"})
    assert r.status == 400 and r.json()["error"] == "bad_sim_header", r
    # Dropped requests still count: the device API saw them.
    stats = http("GET", url + "/_sim/stats").json()
    assert stats["requests"] == 4, stats


def test_sim_drop_once(stack):
    url = _sim(stack)
    token = f"once-{time.time_ns()}"
    try:
        r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop-Once": token})
        raise AssertionError(f"expected no answer, got {r}")
    except (httpclient.RemoteDisconnected, ConnectionResetError, httpclient.BadStatusLine):
        pass
    # The same token again is answered; another token is dropped once too.
    assert http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop-Once": token}).status == 200
    assert http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop-Once": token}).status == 200
    out = raw_http(stack.devsim.port, b"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\n"
                   b"X-Sim-Drop-Once: " + token.encode() + b"-2\r\n\r\n")
    assert out == b"", out
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Drop-Once": "t" * 64})
    assert r.status == 400 and r.json()["error"] == "bad_sim_header", r
    assert http("GET", url + "/_sim/stats").json()["requests"] == 5


def test_sim_framing(stack):
    url = _sim(stack)
    for n in (0, 1, 997, 998, 5000):
        for framing in ("length", "chunked", "close"):
            r = http("GET", url + "/v1/devices/d1",
                     headers={"X-Sim-Framing": framing, "X-Sim-Body-Bytes": str(n)})
            assert r.status == 200 and r.body == b"x" * n, (framing, n, r)
            te = r.headers.get("transfer-encoding")
            if framing == "length":
                assert int(r.headers["content-length"]) == n and te is None, r.headers
            elif framing == "chunked":
                assert te == "chunked" and "content-length" not in r.headers, r.headers
            else:
                assert te is None and "content-length" not in r.headers, r.headers
                assert r.headers["connection"] == "close", r.headers
    # The JSON echo too; bodiless statuses stay bodiless.
    r = http("GET", url + "/v1/devices/d1?a=1", headers={"X-Sim-Framing": "chunked"})
    assert r.status == 200 and r.json()["query"] == {"a": "1"}, r
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Framing": "close", "X-Sim-Status": "204"})
    assert r.status == 204 and r.body == b"", r
    # At the socket level: chunks of at most 997 bytes, and a close after the body.
    out = raw_http(stack.devsim.port, b"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\n"
                   b"X-Sim-Framing: close\r\nX-Sim-Body-Bytes: 3000\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower() and body == b"x" * 3000, out[:300]
    s = socket.create_connection(("127.0.0.1", stack.devsim.port), timeout=10)
    try:
        s.sendall(b"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\nX-Sim-Framing: chunked\r\n"
                  b"X-Sim-Body-Bytes: 2000\r\n\r\n")
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            b = s.recv(65536)
            assert b, data
            data += b
    finally:
        s.close()
    assert b"\r\n\r\n3E5\r\n" in data.upper(), data[:300]
    r = http("GET", url + "/v1/devices/d1", headers={"X-Sim-Framing": "gzip"})
    assert r.status == 400 and r.json()["error"] == "bad_sim_header", r


def test_idle_timeout_env(stack):
    """DEVSIM_IDLE_TIMEOUT_S: an idle keep-alive connection is closed after it."""
    port = harness.free_port()
    sim = stack.spawn("devsim-idle", [stack.bin("devsim")],
                      {"DEVSIM_LISTEN": f"127.0.0.1:{port}", "DEVSIM_IDLE_TIMEOUT_S": "1"}, port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\nX-Sim-Body-Bytes: 0\r\n\r\n")
        t0 = time.time()
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        took = time.time() - t0
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 200"), data
    assert 0.5 < took < 5, took
    assert sim.stop() == 0


def test_control_endpoints(stack):
    url = _sim(stack)
    assert http("GET", url + "/_sim/stats").json()["requests"] == 0
    assert http("GET", url + "/_sim/last").json() == {}
    http("GET", url + "/v1/devices/a1", headers={"X-Api-Key": "k1"})
    http("POST", url + "/v1/devices/a1/commands?force=1", {"c": 1},
         headers={"Authorization": "Bearer t", "X-Request-Id": "r-9", "x-MiXeD": "v"})
    last = http("GET", url + "/_sim/last").json()
    assert last["method"] == "POST"
    assert last["path"] == "/v1/devices/a1/commands"
    assert last["authorization"] == "Bearer t"
    assert last["x-request-id"] == "r-9"
    assert last["x-mixed"] == "v"
    assert "x-api-key" not in last
    # Only /v1 requests count, even unknown ones; control calls and other paths do not.
    http("GET", url + "/_sim/stats")
    http("GET", url + "/elsewhere")
    http("GET", url + "/v1/unknown")
    assert http("GET", url + "/_sim/stats").json()["requests"] == 3
    _idle(stack, url)
    assert http("GET", url + "/_sim/last").json()["path"] == "/v1/unknown"
    r = http("POST", url + "/_sim/reset")
    assert r.status == 200, r
    assert http("GET", url + "/_sim/stats").json()["requests"] == 0
    assert http("GET", url + "/_sim/last").json() == {}
    assert http("POST", url + "/_sim/stats").status == 405
    assert http("GET", url + "/_sim/reset").status == 405
    assert http("GET", url + "/_sim/nothing").status == 404


def test_not_found_and_methods(stack):
    url = _sim(stack)
    for path in ("/", "/v1", "/v1/devices", "/v1/devices/", "/v1/devices/a/b", "/v2/batch"):
        r = http("GET", url + path)
        assert r.status == 404, (path, r)
        assert r.json()["error"] == "not_found"
    assert http("POST", url + "/v1/devices/a").status == 405
    assert http("GET", url + "/v1/devices/a/commands").status == 405
    assert http("GET", url + "/v1/batch").status == 405
    r = http("GET", url + "/nowhere", headers={"X-Sim-Status": "200"})
    assert r.status == 200, r


def test_request_body_limit(stack):
    url = _sim(stack)
    ok = b'{"items":[' + b",".join([b"1"] * 1000) + b"]}"
    ok = ok + b" " * ((1 << 20) - len(ok))
    r = http("POST", url + "/v1/batch", ok)
    assert r.status == 200 and r.json()["items"] == 1000 and r.json()["body_length"] == 1 << 20, r
    r = http("POST", url + "/v1/batch", ok + b" ")
    assert r.status == 413, r
    assert r.json()["body_length"] == (1 << 20) + 1
    assert http("GET", url + "/v1/devices/d1").status == 200


def test_keep_alive(stack):
    url = _sim(stack)
    conn = httpclient.HTTPConnection("127.0.0.1", stack.devsim.port, timeout=10)
    try:
        for i in range(20):
            conn.request("POST", "/v1/devices/k/commands", body=b'{"n":%d}' % i,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 202
            r.read()
    finally:
        conn.close()
    assert http("GET", url + "/_sim/stats").json()["requests"] == 20


def test_concurrent_delayed_requests(stack):
    url = _sim(stack)
    n, delay_ms = 300, 4000

    def one(i):
        r = http("GET", url + f"/v1/devices/c{i}", headers={"X-Sim-Delay-Ms": str(delay_ms)},
                 timeout=60)
        return r.status

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(one, i) for i in range(n)]
        # Served side by side, not one after the other: all of them are in
        # flight at once before the first delay has run out.
        stack.wait_for(lambda: http("GET", url + "/_sim/stats").json()["in_flight"] == n,
                       timeout=delay_ms / 1000 * 0.9, what=f"{n} requests in flight")
        statuses = [f.result() for f in futs]
    took = time.monotonic() - t0
    assert statuses == [200] * n
    assert took < delay_ms / 1000 * 3, took
    assert http("GET", url + "/_sim/stats").json()["requests"] == n
    _idle(stack, url)


def test_shutdown_with_requests_in_flight(stack):
    sim = stack.start_devsim()
    s = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
    s.sendall(b"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\nX-Sim-Delay-Ms: 60000\r\n\r\n")
    stack.wait_for(lambda: http("GET", sim.url + "/_sim/stats").json()["in_flight"] == 1,
                   what="the delayed request")
    idle = socket.create_connection(("127.0.0.1", sim.port), timeout=10)  # keep-alive, idle
    t0 = time.monotonic()
    rc = sim.stop()
    assert rc == 0, (rc, sim.output()[-2000:])
    assert time.monotonic() - t0 < 10
    s.close()
    idle.close()


def test_bad_listen_address(stack):
    import subprocess
    env = dict(stack.env)
    for bad in ("nonsense", "127.0.0.1:0", "127.0.0.1:99999", "no.such.host.invalid:80"):
        env["DEVSIM_LISTEN"] = bad
        p = subprocess.run([stack.bin("devsim")], env=env, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 1, (bad, p.returncode, p.stderr)
        assert "DEVSIM_LISTEN" in p.stderr, p.stderr
        assert "Sanitizer" not in p.stderr, p.stderr
