"""The trust boundary for headers and the parser rules of issue 10 item 7, on
the real gateway, devsim (what the upstream received: /_sim/last, its echo)
and a hand-written upstream where devsim cannot send what a test needs:

- client headers the gateway sets or the upstream trusts never reach the
  upstream, in any spelling ('-' and '_' alike, any case); the upstream's
  X-Points-*, X-Billing-* and X-Request-Id never reach the client;
- X-Forwarded-For always ends with the real peer (several headers joined in
  order), or the request is refused (431); X-Real-IP is the peer; Forwarded
  and other client-claimed addresses are dropped;
- percent-encoded control bytes and double encoding in the path: 400;
- a lone LF in a chunked body (request: 400; response: 502, free);
- an invalid Host: 400; absolute-form targets routed on their path and
  forwarded in origin-form.

Every refusal is checked to have proxied and charged nothing.
"""
import json
import re
import socket

import test_gateway_upstream
from harness import http, raw_http
from test_gateway import _auth, _settled, _sim_requests
from test_gateway_http import _nothing_happened, _setup
from test_gateway_upstream import RawUpstream


def _last(stack):
    return http("GET", stack.devsim.url + "/_sim/last").json()


def _head(method, target, key, extra=b"", host=b"x", version=b"HTTP/1.1"):
    """A request head that closes its connection after the answer (raw_http
    reads to the close)."""
    h = b"Host: " + host + b"\r\n" if host is not None else b""
    return (method + b" " + target + b" " + version + b"\r\n" + h + b"X-Api-Key: " +
            key.encode() + b"\r\nConnection: close\r\n" + extra + b"\r\n")


def _answer(out):
    """(status, [(lower-case name, value)], body) of one raw answer."""
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    hdrs = []
    for line in lines[1:]:
        k, v = line.split(":", 1)
        hdrs.append((k.strip().lower(), v.strip()))
    return int(lines[0].split(" ")[1]), hdrs, body


def _call(stack, req, port=None):
    return _answer(raw_http(port or stack.gateway.port, req))


def _refused(stack, req, status, code):
    st, hdrs, body = _call(stack, req)
    assert st == status, (req, st, body)
    assert dict(hdrs)["content-type"] == "application/json", hdrs
    assert json.loads(body)["error"] == code, (req, body)


# ---- request headers ------------------------------------------------------

SPOOFED = [
    # what the gateway says about the caller, in every spelling
    ("X-Account-Id", "999999"), ("X_Account_Id", "999998"), ("x-account_id", "999997"),
    ("X-ACCOUNT-ID", "999996"),
    ("X-Request-Id", "spoofed-1"), ("X_Request_Id", "spoofed-2"), ("x-request_ID", "spoofed-3"),
    # billing headers
    ("X-Points-Charged", "0"), ("X_Points_Charged", "0"), ("X-Points-Remaining", "1000000"),
    ("X_points_remaining", "1000000"), ("X-Points-Bonus", "50"), ("X-Billing-Plan", "free"),
    ("X_Billing_Plan", "free"),
    # addresses and hosts a proxy would vouch for; the gateway is the edge
    ("X-Real-IP", "6.6.6.6"), ("X_Real_IP", "6.6.6.7"), ("Forwarded", "for=6.6.6.8"),
    ("X_Forwarded_For", "6.6.6.9"), ("X-Forwarded_For", "6.6.6.10"),
    ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https"),
    ("X_Forwarded_Port", "1"), ("True-Client-IP", "6.6.6.11"), ("X-Client-IP", "6.6.6.12"),
    # another method or URL than the one matched and priced
    ("X-HTTP-Method-Override", "POST"), ("X_Http_Method_Override", "DELETE"),
    ("X-Method-Override", "POST"), ("X-Original-URL", "/v1/admin"),
    ("X-Rewrite-URL", "/v1/admin"),
    # the key and the framing, in the other spelling
    ("X_Api_Key", "pgk_" + "B" * 43), ("Content_Length", "5"), ("Transfer_Encoding", "chunked"),
]


def test_spoofed_headers_dropped_in_any_spelling(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in SPOOFED)
    extra += b"X-Custom: kept\r\nX_Custom_Underscore: kept too\r\n"
    st, hdrs, body = _call(stack, _head(b"GET", b"/v1/devices/d1", key, extra))
    assert st == 200, body
    rid = dict(hdrs)["x-request-id"]
    last = _last(stack)
    # Exactly the gateway's values (devsim joins repeats with ", ").
    assert last["x-account-id"] == str(acct), last
    assert last["x-request-id"] == rid, last
    assert last["x-forwarded-for"] == "127.0.0.1", last
    assert last["x-real-ip"] == "127.0.0.1", last
    for name, _ in SPOOFED:
        low = name.lower()
        if low in ("x-account-id", "x-request-id", "x-real-ip"):
            continue
        assert low not in last, (name, last)
    assert not any(v.startswith("6.6.6") for v in last.values() if isinstance(v, str)), last
    assert "transfer-encoding" not in last and "x-api-key" not in last, last
    assert last["x-custom"] == "kept" and last["x_custom_underscore"] == "kept too", last
    assert last["method"] == "GET" and last["path"] == "/v1/devices/d1", last
    _settled(stack, acct, 1)


def test_xff_always_ends_with_the_peer(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    # The case from the issue: a 1,100-byte value used to push the peer out.
    long = ", ".join(f"10.0.{i // 256}.{i % 256}" for i in range(100))[:1100].rstrip(", .")
    assert len(long) > 1000
    r = http("GET", stack.gateway.url + "/v1/devices/d1",
             headers=dict(_auth(key), **{"X-Forwarded-For": long}))
    assert r.status == 200, r
    xff = _last(stack)["x-forwarded-for"]
    assert xff == long + ", 127.0.0.1", xff[-80:]
    # Several headers: one list, in order, the peer last; empty ones skipped.
    extra = (b"X-Forwarded-For: 10.1.1.1, 10.1.1.2\r\nX-Custom: between\r\n"
             b"x-forwarded-for: 10.2.2.2\r\nX-Forwarded-For:\r\n")
    st, _, body = _call(stack, _head(b"GET", b"/v1/devices/d2", key, extra))
    assert st == 200, body
    last = _last(stack)
    assert last["x-forwarded-for"] == "10.1.1.1, 10.1.1.2, 10.2.2.2, 127.0.0.1", last
    assert last["x-real-ip"] == "127.0.0.1", last
    # Past the bound (2,048 bytes of client values together): 431, nothing
    # looked up, proxied or charged.
    before = _sim_requests(stack)
    spent = stack.hot(acct)["spent"]
    big = b"1" * 2049
    _refused(stack, _head(b"GET", b"/v1/devices/d3", key, b"X-Forwarded-For: " + big + b"\r\n"),
             431, "header_too_large")
    half = b"2" * 1024
    _refused(stack, _head(b"GET", b"/v1/devices/d3", key,
                          b"X-Forwarded-For: " + half + b"\r\nX-Forwarded-For: " + half + b"\r\n"),
             431, "header_too_large")
    assert _sim_requests(stack) == before
    assert spent == 2
    _settled(stack, acct, spent)


# ---- answer headers -----------------------------------------------------------

def _billing_headers_answer(c, method, path, headers):
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Points-Charged: 999\r\n"
              b"X_Points_Charged: 998\r\nx-points-remaining: 123456\r\nX-Points-Bonus: 5\r\n"
              b"X-Billing-Plan: gold\r\nX_Billing_Plan: gold\r\nX-Request-Id: upstream-rid\r\n"
              b"X_Request_Id: upstream-rid-2\r\nX-Kept: 1\r\nX-Account-Id: 7\r\n"
              b"Content-Length: 4\r\n\r\nGOOD")
    return True


def test_upstream_billing_headers_do_not_reach_the_client(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    up = RawUpstream(_billing_headers_answer)
    gw = test_gateway_upstream._gateway(stack, "gateway-billing-hdrs", up.url)
    try:
        st, hdrs, body = _call(stack, _head(b"GET", b"/v1/devices/d1", key), port=gw.port)
        assert st == 200 and body == b"GOOD", (st, body)
        names = [k for k, _ in hdrs]
        # Only the gateway's own, once each.
        assert names.count("x-points-charged") == 1 and dict(hdrs)["x-points-charged"] == "1", hdrs
        assert names.count("x-points-remaining") == 1, hdrs
        assert dict(hdrs)["x-points-remaining"] == "9", hdrs
        assert names.count("x-request-id") == 1, hdrs
        assert re.fullmatch(r"[0-9a-f]{32}", dict(hdrs)["x-request-id"]), hdrs
        for n in ("x_points_charged", "x-points-bonus", "x-billing-plan", "x_billing_plan",
                  "x_request_id"):
            assert n not in names, (n, hdrs)
        # Other upstream headers pass.
        assert dict(hdrs)["x-kept"] == "1" and dict(hdrs)["x-account-id"] == "7", hdrs
        assert dict(hdrs)["content-type"] == "text/plain", hdrs
    finally:
        up.stop()
        assert gw.stop() == 0
    _settled(stack, acct, 1)


# ---- paths ------------------------------------------------------------------

def test_encoded_control_bytes_and_double_encoding_refused(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    for path in [b"/v1/devices/ab%0d%0aX-Evil:%201", b"/v1/devices/ab%0D%0A", b"/v1/devices/a%0a",
                 b"/v1/devices/a%00", b"/v1/devices/a%01b", b"/v1/devices/a%09", b"/v1/devices/a%1f",
                 b"/v1/devices/a%1F", b"/v1/devices/a%7f", b"/v1/devices/a%7F",
                 b"/v1/devices/%252e%252e", b"/v1/devices/a%252fb", b"/v1/devices/a%252F",
                 b"/v1/devices/a%2541", b"/v1%2530/devices/x",
                 b"/v1/devices/ab%0d%0aX-Evil:%201?q=1"]:
        _refused(stack, _head(b"GET", path, key), 400, "bad_request")
        r = http("GET", stack.gateway.url + path.decode(), headers=_auth(key))
        assert r.status == 400 and r.json()["error"] == "bad_request", (path, r)
    _nothing_happened(stack, acct, before)
    # A '%' that is data (not followed by two hex digits once decoded) is fine,
    # and so are encoded printable bytes.
    for path in ["/v1/devices/100%25", "/v1/devices/a%25zz", "/v1/devices/%41b%7e"]:
        r = http("GET", stack.gateway.url + path, headers=_auth(key))
        assert r.status == 200, (path, r)
    assert _sim_requests(stack) == before + 3
    _settled(stack, acct, 3)


# ---- chunked bodies -------------------------------------------------------------

def test_chunked_request_with_lone_lf_refused(stack):
    _setup(stack)
    acct, key = stack.new_account(100)
    before = _sim_requests(stack)
    te = b"Transfer-Encoding: chunked\r\n"
    cmd = b"/v1/devices/d1/commands"
    for body in [b"3\nabc\r\n0\r\n\r\n", b"3;ext=1\nabc\r\n0\r\n\r\n", b"3\r\nabc\n0\r\n\r\n",
                 b"3\r\nabc\r\n0\n\r\n", b"3\r\nabc\r\n0\r\n\n",
                 b"3\r\nabc\r\n0\r\nX-T: 1\n\r\n",
                 # the smuggling shape: a lenient reader sees a second request
                 b"3\r\nabc\n0\r\n\r\nGET /v1/devices/smuggled HTTP/1.1\r\nHost: x\r\nX-Api-Key: " +
                 key.encode() + b"\r\n\r\n"]:
        out = raw_http(stack.gateway.port, _head(b"POST", cmd, key, te) + body)
        assert out.startswith(b"HTTP/1.1 400 "), (body, out[:200])
        assert out.count(b"HTTP/1.1 ") == 1, out  # the bytes after it were not read as a request
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request", out
    _nothing_happened(stack, acct, before)
    # With CRLF the same call goes through.
    st, _, body = _call(stack, _head(b"POST", cmd, key, te) +
                        b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    assert st == 202 and json.loads(body)["body_length"] == 3, body
    assert _last(stack)["body_length"] == 3
    _settled(stack, acct, 5)


RESPONSES = {
    "/v1/devices/lf-size": b"5\nhello\r\n0\r\n\r\n",
    "/v1/devices/lf-data": b"5\r\nhello\n0\r\n\r\n",
    "/v1/devices/lf-last": b"5\r\nhello\r\n0\n\r\n",
    "/v1/devices/lf-end": b"5\r\nhello\r\n0\r\n\n",
    "/v1/devices/crlf": b"5\r\nhello\r\n0\r\n\r\n",
}


def _chunked_answer(c, method, path, headers):
    c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + RESPONSES[path])
    return path == "/v1/devices/crlf"


def test_chunked_response_with_lone_lf_is_502_and_free(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    up = RawUpstream(_chunked_answer)
    gw = test_gateway_upstream._gateway(stack, "gateway-lf", up.url)
    try:
        for path in RESPONSES:
            r = http("GET", gw.url + path, headers=_auth(key))
            if path == "/v1/devices/crlf":
                assert r.status == 200 and r.body == b"hello", (path, r)
                assert r.headers["x-points-charged"] == "1", r.headers
            else:
                assert r.status == 502, (path, r)
                assert r.json()["error"] == "upstream_unavailable", r
                assert r.headers["x-points-charged"] == "0", r.headers
        assert len(up.requests) == len(RESPONSES)
    finally:
        up.stop()
        assert gw.stop() == 0
    _settled(stack, acct, 1)


# ---- Host and absolute-form ------------------------------------------------------

def test_invalid_host_refused(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    for host in [b"a b", b"x, y", b"x,y", b"", b":80", b"user@x", b"x:99999", b"[::1", b"x/y",
                 b"\xc3\xa9"]:
        _refused(stack, _head(b"GET", b"/v1/devices/d1", key, host=host), 400, "bad_request")
    # HTTP/1.0 may leave Host out, but not send an invalid one.
    _refused(stack, _head(b"GET", b"/v1/devices/d1", key, host=b"a b", version=b"HTTP/1.0"), 400,
             "bad_request")
    _nothing_happened(stack, acct, before)
    for host in [b"127.0.0.1:%d" % stack.gateway.port, b"[::1]:8080", b"api.example.com",
                 b"api.example.com."]:
        st, _, body = _call(stack, _head(b"GET", b"/v1/devices/d1", key, host=host))
        assert st == 200, (host, body)
    _settled(stack, acct, 4)


def test_absolute_form_targets(stack):
    _setup(stack)
    acct, key = stack.new_account(100)
    before = _sim_requests(stack)
    # Routed on the path, the upstream gets origin-form (devsim reports the
    # path it was asked for, and its query).
    st, hdrs, body = _call(stack, _head(b"GET", b"http://api.example.com/v1/devices/abs1?x=1",
                                        key, host=b"other"))
    assert st == 200, body
    echo = json.loads(body)
    assert echo["path"] == "/v1/devices/abs1" and echo["query"] == {"x": "1"}, echo
    assert dict(hdrs)["x-points-charged"] == "1"
    st, _, body = _call(stack, _head(b"POST", b"HTTPS://[::1]:8443/v1/devices/abs2/commands", key,
                                     b"Content-Length: 2\r\n") + b"{}")
    assert st == 202, body
    last = _last(stack)
    assert last["method"] == "POST" and last["path"] == "/v1/devices/abs2/commands", last
    # HTTP/1.0 needs no Host.
    st, _, body = _call(stack, _head(b"GET", b"http://h/v1/devices/abs3", key, host=None,
                                     version=b"HTTP/1.0"))
    assert st == 200 and json.loads(body)["path"] == "/v1/devices/abs3", body
    assert _sim_requests(stack) == before + 3
    # An empty path is "/": no route there.
    st, _, body = _call(stack, _head(b"GET", b"http://h", key))
    assert st == 404 and json.loads(body)["error"] == "no_route", body
    # Other schemes, userinfo, a bad authority, a bad path, an invalid Host
    # beside it: 400.
    for target in [b"ftp://h/v1/devices/d1", b"file:///v1/devices/d1", b"http:/h/v1/devices/d1",
                   b"http:///v1/devices/d1", b"http://u@h/v1/devices/d1",
                   b"http://u:p@h/v1/devices/d1", b"http://h,i/v1/devices/d1",
                   b"http://h:99999/v1/devices/d1", b"http://h/v1/devices/../x",
                   b"http://h/v1/devices/a%0d%0aX:1", b"http://h//v1/devices/d1",
                   b"api.example.com:443"]:
        _refused(stack, _head(b"GET", target, key), 400, "bad_request")
    _refused(stack, _head(b"GET", b"http://h/v1/devices/d1", key, host=b"a b"), 400,
             "bad_request")
    assert _sim_requests(stack) == before + 3
    _settled(stack, acct, 1 + 5 + 1)


# ---- review r2: paths another parser reads as another path -------------------------

REREAD = [
    # a fragment: cut off by most frameworks before routing, so the call
    # would be priced on one path here and run on another there
    b"/v1/devices/d1#x", b"/v1/devices/d1#/commands", b"/v1/devices/d1?a=1#x",
    b"http://h/v1/devices/d1#x",
    # double encoding spelled with encoded hex digits ("%2e" once decoded)
    b"/v1/devices/%25%32%65%25%32%65", b"/v1/devices/%252%65", b"/v1/devices/a%25%32%66b",
    # overlong UTF-8 ('.', '/' to a lenient decoder)
    b"/v1/devices/%c0%ae%c0%ae", b"/v1/devices/a%c0%afb", b"/v1/devices/%e0%80%ae",
    # dot and empty segments behind a path parameter (servlet containers)
    b"/v1/devices/..;", b"/v1/devices/..;/commands", b"/v1/devices/;jsessionid=1",
    b"/v1/devices/%2e%2e%3b",
]


def test_paths_read_otherwise_upstream_refused(stack):
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    for path in REREAD:
        _refused(stack, _head(b"GET", path, key), 400, "bad_request")
    _refused(stack, _head(b"POST", b"/v1/devices/..;/commands", key, b"Content-Length: 0\r\n"),
             400, "bad_request")
    _nothing_happened(stack, acct, before)
    # What looks close but means one thing everywhere still passes.
    for path in [b"/v1/devices/d1;v=2", b"/v1/devices/%C2%80", b"/v1/devices/a%25%32",
                 b"/v1/devices/...;x"]:
        st, _, body = _call(stack, _head(b"GET", path, key))
        assert st == 200, (path, body)
    assert _sim_requests(stack) == before + 4
    _settled(stack, acct, 4)


# ---- review r2: other punctuation in the names -------------------------------------

OTHER_PUNCT = [("X.Account.Id", "999995"), ("X~Account~Id", "999994"), ("X+Request+Id", "sp-4"),
               ("x.real.ip", "6.6.6.13"), ("X.Forwarded.For", "6.6.6.14"),
               ("X|Forwarded|Host", "evil.example"), ("X.Points.Charged", "0"),
               ("X*Billing*Plan", "free"), ("X`Http`Method`Override", "POST"),
               # address claims that Rails and many PHP apps read before
               # X-Forwarded-For
               ("Client-IP", "6.6.6.15"), ("Client_Ip", "6.6.6.16"),
               ("Fastly-Client-IP", "6.6.6.17"), ("X-Originating-IP", "6.6.6.18"),
               ("X-Remote-IP", "6.6.6.19"), ("X-Remote-Addr", "6.6.6.20")]


def test_spoofed_headers_with_other_punctuation_dropped(stack):
    # lighttpd's CGI and FastCGI read every non-alphanumeric byte of a name
    # as '_': X.Account.Id is HTTP_X_ACCOUNT_ID there.
    _setup(stack)
    acct, key = stack.new_account(10)
    extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in OTHER_PUNCT) + b"X.Custom: kept\r\n"
    st, hdrs, body = _call(stack, _head(b"GET", b"/v1/devices/d1", key, extra))
    assert st == 200, body
    last = _last(stack)
    assert last["x-account-id"] == str(acct), last
    assert last["x-request-id"] == dict(hdrs)["x-request-id"], last
    assert last["x-forwarded-for"] == "127.0.0.1" and last["x-real-ip"] == "127.0.0.1", last
    for name, _ in OTHER_PUNCT:
        assert name.lower() not in last, (name, last)
    assert not any(v.startswith("6.6.6") or v in ("evil.example", "free", "POST")
                   for v in last.values() if isinstance(v, str)), last
    assert last["x.custom"] == "kept", last
    _settled(stack, acct, 1)


def test_two_hosts_refused_in_http10_too(stack):
    # RFC 9112 3.2: more than one Host line is a 400 in any request.
    _setup(stack)
    acct, key = stack.new_account(10)
    before = _sim_requests(stack)
    for extra in [b"Host: b\r\n", b"host: a\r\n"]:
        _refused(stack, _head(b"GET", b"/v1/devices/d1", key, extra, host=b"a",
                              version=b"HTTP/1.0"), 400, "bad_request")
    _nothing_happened(stack, acct, before)
    st, _, body = _call(stack, _head(b"GET", b"/v1/devices/d1", key, host=b"a",
                                     version=b"HTTP/1.0"))
    assert st == 200, body
    _settled(stack, acct, 1)
