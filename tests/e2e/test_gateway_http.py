"""bin/gateway's own HTTP/1.1 server (gateway/server.c, gateway/http1req.c),
on raw sockets: pipelining, the head bound (431), strict header syntax
(obs-fold, NUL, CL+TE, unknown codings), chunked request bodies, the body
bound (413), Expect: 100-continue, HTTP/1.0 keep-alive rules, Host, the
head timeout (slow-loris), a client that leaves while its call is in flight
(charged by the upstream's answer once it was written, free before),
and 1,000 keep-alive connections on the fixed threads. Every refusal is
checked to have reserved, proxied and charged nothing.
"""
import json
import os
import re
import selectors
import resource
import socket
import time

import harness
import test_gateway
from harness import http, raw_http

from test_gateway import ROUTES, _auth, _held_zero, _settled, _sim_requests


def _setup(stack):
    return test_gateway._setup(stack, env={"GATEWAY_THREADS": "2"})


def _gateway(stack, name, env, routes=ROUTES):
    """A gateway of its own to devsim, leases off (every call holds its
    price), with ENV on top."""
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(routes), "GATEWAY_LEASE_CALLS": "0"}
    e.update(env)
    return stack.spawn(name, [stack.bin("gateway")], e, port)


def _connect(stack, port=None, timeout=10):
    return socket.create_connection(("127.0.0.1", port or stack.gateway.port), timeout=timeout)


class Reader:
    """Reads HTTP/1.1 responses (Content-Length framed, as the gateway
    answers) one after another from a socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        b = self.sock.recv(65536)
        if not b:
            raise EOFError("connection closed")
        self.buf += b

    def response(self, head_request=False):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
        n = 0 if head_request or status in (100, 204, 304) else int(hdrs.get("content-length", 0))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return harness.Response(status, hdrs, body)

    def closed(self, timeout=5):
        """True if the peer closes (EOF or reset) within TIMEOUT with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            b = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        self.buf += b
        return b == b""


def _get(path, key, extra=b""):
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
            b"\r\n" + extra + b"\r\n")


def _nothing_happened(stack, acct, before):
    assert _sim_requests(stack) == before
    h = stack.hot(acct)
    assert h.get("spent", 0) == 0 and h.get("held", 0) == 0, h


def test_pipelined_requests_answered_in_order(stack):
    _setup(stack)
    acct, key = stack.new_account(200)
    s = _connect(stack)
    rd = Reader(s)
    s.sendall(_get("/v1/devices/p1", key) + _get("/v1/devices/p2", key) +
              _get("/v1/devices/p3", key))
    rs = [rd.response() for _ in range(3)]
    assert [r.status for r in rs] == [200] * 3, rs
    assert [r.json()["id"] for r in rs] == ["p1", "p2", "p3"], rs
    ids = [r.headers["x-request-id"] for r in rs]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert [r.headers["x-points-remaining"] for r in rs] == ["199", "198", "197"], rs
    # A slow call with 100 more behind it (past the input buffer: reading
    # pauses and resumes), on the same connection: all in order.
    reqs = _get("/v1/devices/slow", key, b"X-Sim-Delay-Ms: 300\r\n")
    reqs += b"".join(_get(f"/v1/devices/q{i}", key, b"X-Pad: " + b"p" * 100 + b"\r\n")
                     for i in range(100))
    s.sendall(reqs)
    rs = [rd.response() for _ in range(101)]
    assert [r.json()["id"] for r in rs] == ["slow"] + [f"q{i}" for i in range(100)]
    s.close()
    _settled(stack, acct, 104)


def test_head_over_16k_is_431(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    out = raw_http(stack.gateway.port,
                   _get("/v1/devices/d1", key, b"X-Big: " + b"b" * (16 * 1024) + b"\r\n"))
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    body = out.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"] == "header_too_large", out
    # Just under the bound is fine.
    r = http("GET", stack.gateway.url + "/v1/devices/d1",
             headers=dict(_auth(key), **{"X-Big": "b" * (15 * 1024)}))
    assert r.status == 200, r
    assert _sim_requests(stack) == before + 1
    _settled(stack, acct, 1)


def _refused(stack, req, status, code):
    out = raw_http(stack.gateway.port, req)
    assert out.startswith(b"HTTP/1.1 %d " % status), (req, out[:300])
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"\r\nConnection: close\r\n" in head + b"\r\n", head
    assert json.loads(body)["error"] == code, (req, out)


def test_malformed_heads_refused(stack):
    """Each before anything is looked up, held or proxied."""
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    k = key.encode()
    head = b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + k + b"\r\n"
    cases = [
        # obs-fold: a line starting with whitespace continues the previous one
        (_get("/v1/devices/d1", key, b"X-A: one\r\n two\r\n"), 400, "bad_request"),
        (_get("/v1/devices/d1", key, b"X-A: one\r\n\ttwo\r\n"), 400, "bad_request"),
        # NUL in a value (used to be cut short at it), bare CR
        (_get("/v1/devices/d1", key, b"X-A: a\x00b\r\n"), 400, "bad_request"),
        (_get("/v1/devices/d1", key, b"X-A: a\rb\r\n"), 400, "bad_request"),
        # smuggling: both framings, conflicting or malformed lengths
        (head + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
         "bad_request"),
        (head + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400,
         "bad_request"),
        (head + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 400, "bad_request"),
        (head + b"Content-Length: +3\r\n\r\nabc", 400, "bad_request"),
        (head + b"Content-Length: 3, 3\r\n\r\nabc", 400, "bad_request"),
        (head + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
        # codings we cannot undo
        (head + b"Transfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
        (head + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "not_implemented"),
        # Host: required by HTTP/1.1, once
        (b"GET /v1/devices/d1 HTTP/1.1\r\nX-Api-Key: " + k + b"\r\n\r\n", 400, "bad_request"),
        (_get("/v1/devices/d1", key, b"Host: y\r\n"), 400, "bad_request"),
        # request lines
        (b"GET  /v1/devices/d1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/devices/d1 HTTP/1.1 \r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/devices/d1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/devices/d1 HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
        (b"G@T /v1/devices/d1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        # expectations other than 100-continue
        (head + b"Expect: something\r\nContent-Length: 2\r\n\r\n{}", 417, "expectation_failed"),
        # a malformed chunked body
        (head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_request"),
    ]
    for req, status, code in cases:
        _refused(stack, req, status, code)
    _nothing_happened(stack, acct, before)


def test_chunked_request_body_reaches_upstream(stack):
    _setup(stack)
    acct, key = stack.new_account(100)
    before = _sim_requests(stack)
    items = json.dumps({"items": list(range(7))}).encode()
    pieces = [items[:5], items[5:6], items[6:]]
    body = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces)
    body += b"0\r\nX-Trailer: dropped\r\n\r\n"
    s = _connect(stack)
    rd = Reader(s)
    # Sent in pieces, the way a streaming client would.
    s.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
              b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(body), 7):
        s.sendall(body[i:i + 7])
        time.sleep(0.005)
    r = rd.response()
    # devsim parsed the JSON (7 items: X-Usage-Units 7, charged 7 x 2).
    assert r.status == 200 and r.json()["items"] == 7, r
    assert r.headers["x-points-charged"] == "14", r.headers
    last = http("GET", stack.devsim.url + "/_sim/last").json()
    assert last["body_length"] == len(items), last
    assert "transfer-encoding" not in last and last["content-length"] == str(len(items)), last
    assert "x-trailer" not in last
    # The connection goes on: the next request on it is answered.
    s.sendall(b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " +
              key.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    r = rd.response()
    assert r.status == 202 and r.json()["body_length"] == 3, r
    s.close()
    assert _sim_requests(stack) == before + 2
    _settled(stack, acct, 14 + 5)
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert stack.psql(f"select count(*), sum(amount) from charges where account_id = {acct}") == \
        [["2", "19"]]


def test_body_over_max_is_413_and_free(stack):
    _setup(stack)
    acct, key = stack.new_account(100)
    before = _sim_requests(stack)
    big = (1 << 20) + 1
    head = (b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
            b"\r\nContent-Length: %d\r\n" % big)
    # With Expect: refused from the length alone, no 100 Continue first.
    s = _connect(stack)
    s.sendall(head + b"Expect: 100-continue\r\n\r\n")
    rd = Reader(s)
    r = rd.response()
    assert r.status == 413 and r.json()["error"] == "request_too_large", r
    assert r.headers["connection"] == "close"
    assert rd.closed()
    s.close()
    # Without: the body is on its way; the answer still arrives whole.
    out = raw_http(stack.gateway.port, head + b"\r\n" + b"x" * big)
    assert out.startswith(b"HTTP/1.1 413 "), out[:200]
    _nothing_happened(stack, acct, before)


def test_expect_100_continue(stack):
    _setup(stack)
    acct, key = stack.new_account(100)
    body = b'{"cmd":"on"}'
    s = _connect(stack)
    s.sendall(b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
              b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    rd = Reader(s)
    r = rd.response()
    assert r.status == 100 and r.body == b"", r
    s.sendall(body)
    r = rd.response()
    assert r.status == 202 and r.json()["body_length"] == len(body), r
    assert r.headers["x-points-charged"] == "5"
    # Refused from the head (no such route): no 100, the answer, then the close.
    s.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
              b"\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    r = rd.response()
    assert r.status == 404 and r.headers["connection"] == "close", r
    assert rd.closed()
    s.close()
    _settled(stack, acct, 5)


def test_early_answer_with_body_here_keeps_connection(stack):
    """A refusal from the head (no route) of a request whose whole body has
    arrived skips that body: the connection goes on with the next request."""
    _setup(stack)
    acct, key = stack.new_account(10)
    s = _connect(stack)
    rd = Reader(s)
    s.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
              b"\r\nContent-Length: 4\r\n\r\nGET " + _get("/v1/devices/after", key))
    r = rd.response()
    assert r.status == 404 and "connection" not in r.headers, r
    r = rd.response()
    assert r.status == 200 and r.json()["id"] == "after", r
    s.close()
    _settled(stack, acct, 1)


def test_http10_keep_alive_rules(stack):
    _setup(stack)
    acct, key = stack.new_account(100)
    auth = b"X-Api-Key: " + key.encode() + b"\r\n"
    # HTTP/1.0 without keep-alive: answered, then closed (no Host needed).
    s = _connect(stack)
    s.sendall(b"GET /v1/devices/d1 HTTP/1.0\r\n" + auth + b"\r\n")
    rd = Reader(s)
    r = rd.response()
    assert r.status == 200 and r.json()["id"] == "d1", r
    assert r.headers["connection"] == "close"
    assert rd.closed()
    s.close()
    # HTTP/1.0 asking for keep-alive: kept, and told so.
    s = _connect(stack)
    rd = Reader(s)
    for i in range(2):
        s.sendall(b"GET /v1/devices/k%d HTTP/1.0\r\nConnection: keep-alive\r\n" % i + auth +
                  b"\r\n")
        r = rd.response()
        assert r.status == 200 and r.headers["connection"].lower() == "keep-alive", r
    s.close()
    # HTTP/1.1 with Connection: close: answered, then closed.
    s = _connect(stack)
    s.sendall(_get("/v1/devices/d1", key, b"Connection: close\r\n"))
    rd = Reader(s)
    assert rd.response().status == 200
    assert rd.closed()
    s.close()
    _settled(stack, acct, 4)


def test_head_timeout_closes_slow_client(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    port = harness.free_port()
    gw = stack.spawn("gateway-slow", [stack.bin("gateway")], {
        "GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
        "ROUTES_FILE": stack.write_routes(ROUTES), "GATEWAY_HEAD_TIMEOUT_MS": "600"}, port)
    try:
        before = _sim_requests(stack)
        s = _connect(stack, port)
        t0 = time.time()
        s.sendall(b"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\nX-Api-")
        time.sleep(0.3)
        s.sendall(b"Key: ")  # a trickle does not extend the deadline
        rd = Reader(s)
        assert rd.closed(timeout=5), "still open"
        took = time.time() - t0
        assert 0.5 <= took < 2.0, took
        assert rd.buf == b"", rd.buf  # closed without an answer
        s.close()
        # A connection that sends nothing is closed too; a prompt one is served.
        s = _connect(stack, port)
        assert Reader(s).closed(timeout=5)
        s.close()
        r = http("GET", gw.url + "/v1/devices/d1", headers=_auth(key))
        assert r.status == 200, r
        assert _sim_requests(stack) == before + 1
    finally:
        assert gw.stop() == 0
    _held_zero(stack, acct)


def _at_upstream(stack, path):
    """Waits until the upstream has received the call to PATH (so it was written)."""
    stack.wait_for(lambda: http("GET", stack.devsim.url + "/_sim/last").json().get("path") == path,
                   timeout=5, what=f"{path} at the upstream")


def _leave(s, how):
    """The client leaves: close, reset (RST, no FIN) or half-close (FIN, still reading)."""
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    elif how == "half-close":
        s.shutdown(socket.SHUT_WR)
    else:
        s.close()


def _charges(stack, acct):
    return sorted(stack.psql(f"select amount, outcome from charges where account_id = {acct}"))


def test_client_leaving_after_send_is_charged(stack):
    """Issue 10 item 1: once the call is at the upstream, a client that leaves
    (close, reset, half-close) does not cancel it: the upstream's 2xx decides,
    the call is charged exactly once, and Postgres shows the charge."""
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    socks = []
    for how in ("close", "reset", "half-close"):
        s = _connect(stack)
        s.sendall(_get(f"/v1/devices/{how}", key, b"X-Sim-Delay-Ms: 1500\r\n"))
        _at_upstream(stack, f"/v1/devices/{how}")
        _leave(s, how)
        socks.append(s)
        # Still held while the upstream works: nothing was released.
        time.sleep(0.3)
        assert stack.hot(acct).get("held") == 1, stack.hot(acct)
        # Then the answer settles it: charged the route's price, once.
        _held_zero(stack, acct)
    for s in socks:
        s.close()
    assert _sim_requests(stack) == before + 3
    h = stack.hot(acct)
    assert h["spent"] == 3 and h["held"] == 0, h
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert _charges(stack, acct) == [["1", "commit"]] * 3
    assert stack.scalar(f"select spent from accounts where id = {acct}") == "3"


def test_client_leaving_after_send_upstream_failure_costs_nothing(stack):
    """The same, but the upstream answers 5xx (not billable): 0, released."""
    _setup(stack)
    acct, key = stack.new_account(10)
    for how in ("close", "reset"):
        s = _connect(stack)
        s.sendall(_get(f"/v1/devices/f{how}", key,
                       b"X-Sim-Delay-Ms: 1000\r\nX-Sim-Status: 503\r\n"))
        _at_upstream(stack, f"/v1/devices/f{how}")
        _leave(s, how)
        time.sleep(0.3)
        assert stack.hot(acct).get("held") == 1, stack.hot(acct)
        _held_zero(stack, acct)
    assert stack.hot(acct)["spent"] == 0
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    rows = _charges(stack, acct)
    assert len(rows) == 2 and all(r[0] == "0" for r in rows), rows
    assert stack.scalar(f"select spent from accounts where id = {acct}") == "0"


def test_client_leaving_before_send_costs_nothing(stack):
    """A call not yet written to the upstream (queued for its only
    connection) is dropped at once when its client leaves: released, never
    proxied, cost 0; the call ahead of it is charged as usual."""
    _setup(stack)
    acct, key = stack.new_account(10)
    gw = _gateway(stack, "gateway-onecon", {"GATEWAY_THREADS": "1",
                                            "UPSTREAM_MAX_CONNECTIONS": "1"})
    port = gw.port
    try:
        before = _sim_requests(stack)
        first = _connect(stack, port)
        first.sendall(_get("/v1/devices/first", key, b"X-Sim-Delay-Ms: 2000\r\n"))
        _at_upstream(stack, "/v1/devices/first")
        s = _connect(stack, port)
        s.sendall(_get("/v1/devices/queued", key))
        stack.wait_for(lambda: stack.hot(acct).get("held") == 2, timeout=5, what="the queued call's hold")
        t0 = time.time()
        s.close()
        stack.wait_for(lambda: stack.hot(acct).get("held") == 1, timeout=5, what="its release")
        assert time.time() - t0 < 1.5  # at once, not when the connection frees up
        r = Reader(first).response()
        assert r.status == 200 and r.headers["x-points-charged"] == "1", r
        first.close()
        _held_zero(stack, acct)
        time.sleep(0.3)
        assert _sim_requests(stack) == before + 1  # the queued call never reached it
    finally:
        assert gw.stop() == 0
    assert stack.hot(acct)["spent"] == 1
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert _charges(stack, acct) == [["0", "release"], ["1", "commit"]]


def test_client_leaving_with_pipelined_bytes_queued_is_charged_once(stack):
    """Reads pause while the input buffer is full of pipelined bytes; the
    client's close is still noticed (its pipelined requests are never
    served), and the call already at the upstream is charged once."""
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    s = _connect(stack)
    s.sendall(_get("/v1/devices/piped", key, b"X-Sim-Delay-Ms: 1500\r\n"))
    _at_upstream(stack, "/v1/devices/piped")
    # More than the room left behind the head: reading pauses.
    s.sendall(b"".join(_get(f"/v1/devices/q{i}", key, b"X-Pad: " + b"p" * 400 + b"\r\n")
                       for i in range(30)))
    time.sleep(0.2)
    s.close()
    _held_zero(stack, acct)
    time.sleep(0.5)
    assert _sim_requests(stack) == before + 1
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert stack.hot(acct)["spent"] == 1
    assert _charges(stack, acct) == [["1", "commit"]]


def test_orphaned_calls_count_against_max_connections(stack):
    """Calls whose clients left keep their connection slot until the
    upstream answers: a flood of leave-after-send cannot grow past
    MAX_CONNECTIONS. Past it new connections are refused; once the orphans
    are settled (each charged once) the gateway serves again."""
    _setup(stack)
    acct, key = stack.new_account(100)
    gw = _gateway(stack, "gateway-maxconn", {"GATEWAY_THREADS": "1", "MAX_CONNECTIONS": "4"})
    port = gw.port
    try:
        before = _sim_requests(stack)
        for i in range(4):
            s = _connect(stack, port)
            s.sendall(_get(f"/v1/devices/o{i}", key, b"X-Sim-Delay-Ms: 2500\r\n"))
            _at_upstream(stack, f"/v1/devices/o{i}")
            s.close()
        # Every slot is an orphan's: a new client is closed without an answer.
        s = _connect(stack, port)
        s.sendall(_get("/v1/devices/extra", key))
        assert Reader(s).closed(timeout=1), "served past MAX_CONNECTIONS"
        assert Reader(s).buf == b""
        s.close()
        _held_zero(stack, acct)
        r = stack.wait_for(lambda: (lambda x: x if x.status == 200 else None)(
            http("GET", gw.url + "/v1/devices/after", headers=_auth(key))), timeout=5,
            what="served again")
        assert r.headers["x-points-charged"] == "1"
        assert _sim_requests(stack) == before + 5
    finally:
        assert gw.stop() == 0
    assert stack.hot(acct)["spent"] == 5
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    assert _charges(stack, acct) == [["1", "commit"]] * 5


def test_pipelining_flood_is_answered_in_order_and_shares_the_worker(stack):
    """A client pipelining instant answers (404s) is answered in bursts and
    does not hold its worker: a second client is served meanwhile, and the
    flood's answers all come back, in order."""
    _setup(stack)
    acct, key = stack.new_account(10)
    n = 3000
    req = b"GET /nope/%d HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = _connect(stack, timeout=30)
    rd = Reader(flood)
    sel = selectors.DefaultSelector()
    flood.setblocking(False)
    sel.register(flood, selectors.EVENT_READ | selectors.EVENT_WRITE)
    out = b"".join(req % i for i in range(n))
    got, other = [], None
    deadline = time.time() + 30
    while len(got) < n and time.time() < deadline:
        for k, ev in sel.select(timeout=1):
            if ev & selectors.EVENT_WRITE and out:
                try:
                    out = out[flood.send(out[:65536]):]
                except BlockingIOError:
                    pass
                if not out:
                    sel.modify(flood, selectors.EVENT_READ)
            if ev & selectors.EVENT_READ:
                try:
                    b = flood.recv(65536)
                except BlockingIOError:
                    continue
                assert b, "gateway closed the flooding connection"
                rd.buf += b
                while b"\r\n\r\n" in rd.buf:
                    head, rest = rd.buf.split(b"\r\n\r\n", 1)
                    clen = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                    if len(rest) < clen:
                        break
                    got.append(int(head.split(b" ")[1]))
                    rd.buf = rest[clen:]
        if other is None and len(got) > n // 3:
            # Mid-flood, on another connection: served, and promptly.
            t0 = time.time()
            other = http("GET", stack.gateway.url + "/v1/devices/d1", headers=_auth(key))
            other_s = time.time() - t0
    assert got == [404] * n, (len(got), got[:5])
    assert other is not None and other.status == 200, other
    assert other_s < 2.0, other_s
    flood.close()
    _held_zero(stack, acct)


def test_many_empty_lines_refused_at_once(stack):
    """Empty lines before a request line: a few are allowed; a head of 16 KiB
    of them is refused (400) without rescanning it line after line."""
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    r = raw_http(stack.gateway.port,
                 b"\r\n\n" + _get("/v1/devices/d1", key, b"Connection: close\r\n"))
    assert r.startswith(b"HTTP/1.1 200 "), r[:200]
    t0 = time.time()
    for _ in range(10):
        out = raw_http(stack.gateway.port, b"\n" * (16 * 1024))
        assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert time.time() - t0 < 5.0
    assert _sim_requests(stack) == before + 1
    _settled(stack, acct, 1)


def test_random_clients_leave_nothing_held(stack):
    """200 clients with seeded random behaviour (whole requests, heads cut
    anywhere, bodies cut short, pipelined pairs, slow calls left by close or
    reset, garbage): afterwards every hold is released, Redis and Postgres
    agree, the gateway still serves, and (at the suite's end) exits clean
    under the sanitizers."""
    import random
    import threading
    _setup(stack)
    acct, key = stack.new_account(100000)
    rnd = random.Random(20261125)
    post = (b"POST /v1/devices/d1/commands HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
            b'{"command":"unlock"}')
    slow = _get("/v1/devices/slow", key, b"X-Sim-Delay-Ms: 400\r\n")
    plans = []
    for i in range(200):
        kind = rnd.choice(["whole", "cut", "pipelined", "slow-close", "slow-reset", "garbage"])
        base = rnd.choice([_get(f"/v1/devices/r{i}", key), post])
        if kind == "whole":
            data = base
        elif kind == "cut":
            data = base[:rnd.randrange(1, len(base))]
        elif kind == "pipelined":
            data = base + rnd.choice([_get(f"/v1/devices/s{i}", key), post])
        elif kind == "garbage":
            data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))
        else:
            data = slow
        plans.append((kind, data, rnd.random()))

    def client(plan):
        kind, data, r = plan
        try:
            s = _connect(stack, timeout=5)
            s.sendall(data)
            if kind.startswith("slow"):
                time.sleep(0.05 + 0.3 * r)
                if kind == "slow-reset":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 b"\x01\x00\x00\x00\x00\x00\x00\x00")
            elif kind in ("whole", "pipelined") and r < 0.5:
                s.recv(65536)  # read an answer, or part of it, before leaving
            s.close()
        except OSError:
            pass

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _held_zero(stack, acct)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    spent = stack.hot(acct)["spent"]
    assert stack.scalar(f"select spent from accounts where id = {acct}") == str(spent)
    assert stack.scalar(f"select coalesce(sum(amount), 0) from charges where account_id = {acct}") \
        == str(spent)
    r = http("GET", stack.gateway.url + "/v1/devices/after", headers=_auth(key))
    assert r.status == 200, r


def test_1000_keepalive_connections_on_fixed_threads(stack):
    _setup(stack)
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * n), hard))
    acct, key = stack.new_account(n)
    pid = stack.gateway.p.pid
    threads = len(os.listdir(f"/proc/{pid}/task"))
    socks = [_connect(stack) for _ in range(n)]
    sel = selectors.DefaultSelector()
    readers = {}
    for i, s in enumerate(socks):
        s.sendall(_get(f"/v1/devices/c{i}", key))
        readers[s] = Reader(s)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    assert len(os.listdir(f"/proc/{pid}/task")) == threads  # no thread per connection
    done = {}
    deadline = time.time() + 60
    while len(done) < n and time.time() < deadline:
        for k, _ in sel.select(1):
            s = k.fileobj
            rd = readers[s]
            rd.buf += s.recv(65536)
            if b"\r\n\r\n" in rd.buf:
                head = rd.buf.split(b"\r\n\r\n", 1)[0]
                clen = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                if len(rd.buf) >= len(head) + 4 + clen:
                    s.setblocking(True)
                    done[s] = rd.response()
                    sel.unregister(s)
    sel.close()
    assert len(done) == n, f"{len(done)}/{n} answered"
    bad = [r for r in done.values() if r.status != 200]
    assert not bad, (len(bad), bad[0].status, bad[0].body[:300])
    assert sorted(r.json()["id"] for r in done.values()) == sorted(f"c{i}" for i in range(n))
    assert len(os.listdir(f"/proc/{pid}/task")) == threads
    for s in socks:
        s.close()
    _settled(stack, acct, n)
