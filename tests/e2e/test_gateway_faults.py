"""bin/gateway under faults and load: Redis going away and coming back (fail
closed with 503, settles queued and resent), graceful shutdown with calls in
flight, and 1000 concurrent keep-alive connections.
"""
import os
import selectors
import resource
import signal
import socket
import subprocess
import threading
import time

import harness
from harness import http

from test_gateway import ROUTES, _auth, _held_zero, _sim_requests


def _setup(stack):
    # Billing writes pg:epoch after a rebuild (h5b); without it a key Redis
    # does not know is answered 503 (data lost), not 401.
    stack.redis("SET", "pg:epoch", "test", "NX")
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
        stack.start_gateway(ROUTES)
        # Accounts for the Redis-outage tests, made while Redis is healthy:
        # after a Redis restart billing's first pushes may fail and wait for
        # its repair pass, which is billing's business, not this module's.
        stack.gwf_accounts = [_account(stack, 100) for _ in range(2)]
    http("POST", stack.devsim.url + "/_sim/reset")
    return stack.gateway.url


def _account(stack, points):
    """A new account whose credit has reached Redis: after an outage billing
    may push it through its credit sync a moment later than the API call."""
    acct, key = stack.new_account(points)
    stack.wait_for(lambda: stack.hot(acct).get("credited") == points, timeout=15,
                   what="credit in redis")
    return acct, key


def test_graceful_shutdown_finishes_calls(stack):
    _setup(stack)
    acct, key = _account(stack, 100)
    port = harness.free_port()
    gw = stack.spawn("gateway-drain", [stack.bin("gateway")], {
        "GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
        "ROUTES_FILE": stack.write_routes(ROUTES)}, port)
    out = []

    def call(i):
        out.append(http("GET", gw.url + f"/v1/devices/d{i}",
                        headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "800"})))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    stack.wait_for(lambda: stack.hot(acct).get("held") == 5, timeout=5, what="5 holds")
    gw.signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused, "still accepting after SIGTERM"
    for t in threads:
        t.join(10)
    assert [r.status for r in out] == [200] * 5, out
    assert gw.p.wait(15) == 0
    h = stack.hot(acct)
    assert h["spent"] == 5 and h["held"] == 0, h
    assert "drain" in gw.output()


def test_bad_config_refuses_to_start(stack):
    base = {"GATEWAY_LISTEN": f"127.0.0.1:{harness.free_port()}", "UPSTREAM_URL": "http://127.0.0.1:1",
            "ROUTES_FILE": stack.write_routes(ROUTES)}
    bad_routes = stack.write_routes({"routes": [{"id": "x", "method": "GET", "path": "/a"}]})
    cases = [{"KEY_PEPPER": "short"}, {"UPSTREAM_URL": "ftp://x"}, {"GATEWAY_LISTEN": "nope"},
             {"REDIS_URL": "http://x"}, {"ROUTES_FILE": "/nonexistent.json"},
             {"ROUTES_FILE": bad_routes}, {"MAX_BODY_BYTES": "-1"}, {"GATEWAY_THREADS": "0"},
             {"OUTBOX_MAX_BACKLOG": "0"}, {"OUTBOX_MAX_BACKLOG": "lots"},
             {"GATEWAY_DRAIN_TIMEOUT_MS": "-5"}, {"GATEWAY_SETTLE_QUEUE_MAX": "1"},
             {"GATEWAY_SPILL_DIR": "/proc/no/such/spill"}]
    for extra in cases:
        env = dict(stack.env, **base)
        env.update(extra)
        p = subprocess.run([stack.bin("gateway")], env=env, capture_output=True, text=True,
                           timeout=20)
        assert p.returncode != 0, (extra, p.stderr)
        assert "error" in p.stderr, (extra, p.stderr)
        assert "Sanitizer" not in p.stderr, p.stderr


def test_1000_keepalive_connections(stack):
    gw = _setup(stack)
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * n), hard))
    acct, key = _account(stack, 3 * n)
    before = _sim_requests(stack)
    req = (f"GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\nX-Api-Key: {key}\r\n\r\n").encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10)
        socks.append(s)
    t0 = time.time()
    for rnd in range(2):
        sel = selectors.DefaultSelector()
        bufs = {}
        for s in socks:
            s.sendall(req)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            bufs[s] = b""
        done = 0
        deadline = time.time() + 60
        statuses = []
        while done < n and time.time() < deadline:
            for k, _ in sel.select(1):
                s = k.fileobj
                b = s.recv(65536)
                assert b, "connection closed by the gateway"
                bufs[s] += b
                head, sep, rest = bufs[s].partition(b"\r\n\r\n")
                if not sep:
                    continue
                clen = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")][0]
                if len(rest) >= clen:
                    statuses.append(int(head.split(b" ")[1]))
                    sel.unregister(s)
                    s.setblocking(True)
                    done += 1
        sel.close()
        assert done == n, f"round {rnd}: {done}/{n} answered"
        assert statuses.count(200) == n, {c: statuses.count(c) for c in set(statuses)}
    took = time.time() - t0
    for s in socks:
        s.close()
    assert _sim_requests(stack) == before + 2 * n
    h = stack.hot(acct)
    stack.wait_for(lambda: stack.hot(acct)["held"] == 0, timeout=10, what="held 0")
    assert stack.hot(acct)["spent"] == 2 * n, h
    print(f"{2 * n} calls on {n} keep-alive connections in {took:.2f}s")


def test_redis_stalled_fails_closed(stack):
    """A Redis that accepts but never answers (SIGSTOP) must not hang calls:
    the watchdog drops the link, calls get 503, and service resumes after."""
    gw = _setup(stack)
    acct, key = _account(stack, 100)
    assert http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200
    pid = int(open(os.path.join(stack.dir, "redis", "redis.pid")).read())
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        r = http("GET", gw + "/v1/devices/d1", headers=_auth(key), timeout=15)
        assert r.status == 503 and r.json()["error"] == "billing_unavailable", r
        assert time.time() - t0 < 6, time.time() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    stack.wait_for(lambda: http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200,
                   timeout=10, what="served again")
    _held_zero(stack, acct)


def test_redis_down_503_then_recovers(stack):
    gw = _setup(stack)
    acct, key = stack.gwf_accounts.pop()
    # Healthy first (an earlier test may have left the gateway reconnecting).
    stack.wait_for(lambda: http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200,
                   timeout=10, what="gateway serving before the outage")
    before = _sim_requests(stack)
    stack.service("redis-stop")
    try:
        for _ in range(6):
            r = http("GET", gw + "/v1/devices/d1", headers=_auth(key))
            assert r.status == 503, r
            assert r.json()["error"] == "billing_unavailable"
            assert "x-request-id" in r.headers
        assert _sim_requests(stack) == before  # fail closed: nothing proxied
    finally:
        stack.service("redis-start")
    stack.wait_for(lambda: all(http("GET", gw + "/v1/devices/d1", headers=_auth(key)).status == 200
                               for _ in range(4)), timeout=10, what="served again")
    _held_zero(stack, acct)
    assert stack.gateway.alive()


def test_settle_queued_while_redis_down(stack):
    """Redis goes away while a call is at the upstream: the answer still goes
    out, the settle is queued and applied when Redis is back."""
    gw = _setup(stack)
    acct, key = stack.gwf_accounts.pop()
    spent0 = stack.hot(acct)["spent"]
    out = {}

    def call():
        out["r"] = http("GET", gw + "/v1/devices/d1",
                        headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "1500"}))

    t = threading.Thread(target=call)
    t.start()
    stack.wait_for(lambda: stack.hot(acct).get("held") == 1 or "r" in out, timeout=5, what="hold")
    assert "r" not in out, out
    stack.service("redis-stop")
    t.join(10)
    r = out["r"]
    assert r.status == 200, r
    assert r.headers["x-points-charged"] == "1"
    assert "x-points-remaining" not in r.headers
    stack.service("redis-start")
    stack.wait_for(lambda: stack.hot(acct).get("spent") == spent0 + 1, timeout=10,
                   what="queued settle applied")
    _held_zero(stack, acct)


def test_usage_endpoint_postgres_restart(stack):
    """Postgres goes away: /_billing/usage answers 503 at once while every
    billed call still goes through; it answers again once Postgres is back
    (the gateway reconnects lazily, on the next report)."""
    gw = _setup(stack)
    acct, key = _account(stack, 100)
    q = "/_billing/usage?from=2024-01-01&to=2024-12-31"

    def usage_all():  # fresh connections: reach every worker
        return [http("GET", gw + q, headers=_auth(key)).status for _ in range(8)]

    assert usage_all() == [200] * 8
    stack.service("pg-stop")
    try:
        t0 = time.time()
        assert usage_all() == [503] * 8
        assert time.time() - t0 < 5
        for i in range(5):
            r = http("GET", gw + f"/v1/devices/d{i}", headers=_auth(key))
            assert r.status == 200 and r.headers["x-points-remaining"] == str(99 - i), r
    finally:
        stack.service("pg-start")
    stack.wait_for(lambda: usage_all() == [200] * 8, timeout=10, what="usage back")
    assert stack.gateway.alive()
    _held_zero(stack, acct)


def test_dependency_names_resolved_once_at_start(stack):
    """REDIS_URL and DATABASE_URL may name their hosts: the gateway resolves
    the names when it starts (getaddrinfo blocks, so never on its loops) and
    serves; a name that does not resolve stops it at once, saying which."""
    _setup(stack)
    acct, key = _account(stack, 10)
    env = {"REDIS_URL": stack.gateway_redis_url.replace("127.0.0.1", "localhost"),
           "DATABASE_URL": stack.gateway_database_url.replace("127.0.0.1", "localhost")}
    assert "localhost" in env["DATABASE_URL"]
    port = harness.free_port()
    gw = stack.spawn("gateway-names", [stack.bin("gateway")], dict(env, **{
        "GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
        "ROUTES_FILE": stack.write_routes(ROUTES)}), port)
    try:
        r = http("GET", gw.url + "/v1/devices/d1", headers=_auth(key))
        assert r.status == 200 and r.headers["x-points-remaining"] == "9", r
        r = http("GET", gw.url + "/_billing/usage?from=2024-01-01&to=2024-12-31",
                 headers=_auth(key))
        assert r.status == 200, r
        assert "resolved localhost to" in gw.output()
    finally:
        assert gw.stop() == 0
    for var, url in (("REDIS_URL", "redis://no-such-host.invalid:6379/0"),
                     ("DATABASE_URL", "postgresql://postgres@no-such-host.invalid:5432/x")):
        e = dict(stack.env, GATEWAY_LISTEN=f"127.0.0.1:{harness.free_port()}",
                 UPSTREAM_URL=stack.devsim.url, ROUTES_FILE=stack.write_routes(ROUTES))
        e[var] = url
        p = subprocess.run([stack.bin("gateway")], env=e, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0, (var, p.stderr[-2000:])
        assert "cannot resolve no-such-host.invalid" in p.stderr, (var, p.stderr[-2000:])
    _held_zero(stack, acct)


def test_settle_refused_by_a_replica_is_resent(stack):
    """A Redis that turns replica mid-call (a failover) refuses the settle
    with READONLY: the gateway keeps the settle and resends it until a
    primary takes it; the call is charged exactly once, nothing is swept."""
    gw = _setup(stack)
    acct, key = _account(stack, 100)
    out = []
    t = threading.Thread(target=lambda: out.append(http(
        "POST", gw + "/v1/devices/d1/commands", body=b'{"command":"unlock"}',
        headers=dict(_auth(key), **{"Content-Type": "application/json",
                                    "X-Sim-Delay-Ms": "1500"}))))
    t.start()
    stack.wait_for(lambda: stack.hot(acct).get("held") == 5, timeout=5, what="the hold")
    dead = harness.free_port()  # nothing listens: the replica never syncs, keeps its data
    assert stack.redis_raw("REPLICAOF", "127.0.0.1", dead) == "OK"
    try:
        t.join(20)
        assert out and out[0].status == 202, out  # the simulator accepts commands with 202
        # A new call meanwhile: the replica refuses its hold, 503, not proxied.
        before = _sim_requests(stack)
        r = http("GET", gw + "/v1/devices/d2", headers=_auth(key))
        assert r.status == 503 and r.json()["error"] == "billing_unavailable", r
        assert _sim_requests(stack) == before
        time.sleep(1.0)  # resends are refused meanwhile
        assert stack.hot(acct)["held"] == 5 and stack.hot(acct)["spent"] == 0
    finally:
        assert stack.redis_raw("REPLICAOF", "NO", "ONE") == "OK"
    stack.wait_for(lambda: stack.hot(acct).get("spent") == 5, timeout=15, what="settle resent")
    assert stack.hot(acct)["held"] == 0
    stack.wait_for(stack.drained, timeout=20, what="outbox drained")
    rows = stack.psql(f"select amount, outcome from charges where account_id = {acct}")
    assert rows == [["5", "commit"]], rows
    assert "READONLY" in stack.gateway.output()


def test_redis_connect_that_hangs_fails_calls_in_seconds(stack):
    """hiredis has no connect timeout: a Redis whose address drops our SYNs
    (here a listener with a full accept queue) must not hold calls for the
    kernel's two minutes. The gateway gives up the connect and answers 503."""
    _setup(stack)
    acct, key = _account(stack, 10)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue: further SYNs are dropped
            c = socket.socket()
            c.settimeout(0.5)
            try:
                c.connect(hole.getsockname())
            except OSError:
                pass
            fillers.append(c)
        port = harness.free_port()
        gw = stack.spawn("gateway-hole", [stack.bin("gateway")], {
            "GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
            "ROUTES_FILE": stack.write_routes(ROUTES), "GATEWAY_THREADS": "1",
            "REDIS_URL": f"redis://127.0.0.1:{hole.getsockname()[1]}/0"}, port)
        t0 = time.time()
        r = http("GET", gw.url + "/v1/devices/d1", headers=_auth(key), timeout=30)
        took = time.time() - t0
        assert r.status == 503 and r.json()["error"] == "billing_unavailable", r
        assert took < 10, took
        assert "no connection after" in gw.output()
        assert gw.stop() == 0
    finally:
        for c in fillers:
            c.close()
        hole.close()
    assert stack.hot(acct)["held"] == 0


def test_settle_on_unusable_data_says_nothing_was_charged(stack):
    """An account whose hold Redis cannot read at settle (a human edited it)
    is not charged, and the answer says so rather than the route's price."""
    gw = _setup(stack)
    acct, key = _account(stack, 100)
    out = []
    t = threading.Thread(target=lambda: out.append(http(
        "GET", gw + "/v1/devices/d1", headers=dict(_auth(key), **{"X-Sim-Delay-Ms": "800"}))))
    t.start()
    stack.wait_for(lambda: stack.hot(acct).get("held") == 1, timeout=5, what="the hold")
    holds = f"pg:{{{acct}}}:holds"
    (rid,) = stack.redis_raw("HKEYS", holds).split()
    stack.redis_raw("HSET", holds, rid, "garbage")
    t.join(10)
    assert out and out[0].status == 200, out
    assert out[0].headers["x-points-charged"] == "0", out[0].headers
    assert "unusable data" in stack.gateway.output()
    assert stack.hot(acct)["spent"] == 0
    stack.redis_raw("HDEL", holds, rid)  # the human's repair
    stack.redis_raw("HINCRBY", f"pg:{{{acct}}}:acct", "held", -1)


def _spawn_gateway(stack, env):
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(ROUTES), "GATEWAY_THREADS": "2"}
    e.update(env)
    return stack.spawn("gateway-x", [stack.bin("gateway")], e, port)


def test_backlog_at_its_bound_refuses_reserves_and_leases(stack):
    """pg:backlog at OUTBOX_MAX_BACKLOG (set by hand here): every worker
    refuses new calls with 503 billing_unavailable, per-call holds and
    leased calls alike, and nothing reaches the upstream; below it again,
    calls are served within a poll or two."""
    _setup(stack)
    small_acct, small_key = _account(stack, 100)
    big_acct, big_key = _account(stack, 1_000_000)
    gw = _spawn_gateway(stack, {"OUTBOX_MAX_BACKLOG": "500"})
    try:
        for _ in range(30):  # the big account gets a lease
            assert http("GET", gw.url + "/v1/devices/d1", headers=_auth(big_key)).status == 200
        stack.wait_for(lambda: stack.leases(), timeout=10, what="a lease")
        assert http("GET", gw.url + "/v1/devices/d1", headers=_auth(small_key)).status == 200
        # Far above: settlement lowers it as it applies the calls above.
        stack.redis("SET", "pg:backlog", "1000000")
        time.sleep(1.0)  # a few polls (every 200 ms)
        before = _sim_requests(stack)
        for key in (small_key, big_key) * 4:
            r = http("GET", gw.url + "/v1/devices/d1", headers=_auth(key))
            assert r.status == 503, r
            assert r.json()["error"] == "billing_unavailable", r
        assert _sim_requests(stack) == before
        stack.redis("SET", "pg:backlog", "400")
        stack.wait_for(lambda: http("GET", gw.url + "/v1/devices/d1",
                                    headers=_auth(small_key)).status == 200,
                       timeout=5, what="served below the bound")
        stack.redis("DEL", "pg:backlog")
        stack.wait_for(lambda: http("GET", gw.url + "/v1/devices/d1",
                                    headers=_auth(big_key)).status == 200,
                       timeout=5, what="served again")
    finally:
        stack.redis("DEL", "pg:backlog")
        gw.stop()
    _held_zero(stack, small_acct)


def test_backlog_bound_while_billing_is_down(stack):
    """The real thing (needs settle.lua's pg:backlog counter): billing down,
    calls are answered until the outbox holds OUTBOX_MAX_BACKLOG records,
    then 503; billing back, settlement drains it and calls are served again;
    every answered charge is in Postgres."""
    _setup(stack)
    acct, key = _account(stack, 1000)
    bound = 20
    gw = _spawn_gateway(stack, {"OUTBOX_MAX_BACKLOG": str(bound), "GATEWAY_LEASE_CALLS": "0"})
    charged = 0
    try:
        stack.billing.stop()
        statuses = []
        for _ in range(bound * 4):
            r = http("GET", gw.url + "/v1/devices/d1", headers=_auth(key))
            statuses.append(r.status)
            if r.status == 200:
                charged += int(r.headers["x-points-charged"])
            time.sleep(0.05)
        assert statuses.count(200) >= bound, statuses
        assert statuses.count(200) <= bound + 10, statuses  # a poll's worth of lag at most
        assert statuses[-10:] == [503] * 10, statuses
        assert int(stack.redis_raw("GET", "pg:backlog") or 0) >= bound
    finally:
        stack.start_billing()
    stack.wait_for(lambda: http("GET", gw.url + "/v1/devices/d1", headers=_auth(key)).status
                   == 200, timeout=30, what="served after billing drained the backlog")
    charged += 1
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    stack.wait_for(lambda: int(stack.scalar(f"SELECT spent FROM accounts WHERE id = {acct}"))
                   == charged, timeout=30, what=f"spent {charged} in postgres")
    gw.stop()


def test_redis_without_its_data_answers_503_not_401(stack):
    """Redis lost its data (FLUSHALL; pg:epoch gone): a valid key Redis no
    longer knows, and an unknown one, get 503 billing_unavailable, not 401,
    and the answer is not cached as "no such key"; once pg:epoch is back an
    unknown key is 401 again."""
    _setup(stack)
    acct, key = _account(stack, 100)  # never looked up: not in any cache
    gw = _spawn_gateway(stack, {})
    unknown = {"Authorization": "Bearer pgk_" + "A" * 43}
    billing_env = None
    try:
        # Billing would rebuild Redis at once (that is its test): keep it away.
        stack.billing.stop()
        stack.redis("FLUSHALL")
        for h in (_auth(key), unknown, _auth(key)):
            r = http("GET", gw.url + "/v1/devices/d1", headers=h)
            assert r.status == 503, r
            assert r.json()["error"] == "billing_unavailable", r
        # The data comes back (by hand: the key, the account, the marker):
        # the same key is served, so the 503 was not cached as unknown.
        hk = __import__("test_gateway").key_hash(key)
        stack.redis("SET", f"pg:key:{hk}", acct)
        stack.redis("HSET", f"pg:{{{acct}}}:acct", "credited", 100, "spent", 0, "held", 0)
        stack.redis("SET", "pg:epoch", "test")
        r = http("GET", gw.url + "/v1/devices/d1", headers=unknown)
        assert r.status == 401, r
        r = http("GET", gw.url + "/v1/devices/d1", headers=_auth(key))
        assert r.status == 200, r
    finally:
        stack.redis("SET", "pg:epoch", "test", "NX")
        stack.start_billing(billing_env)
        gw.stop()
    # Billing's repair pass puts back what the flush took (the accounts of
    # the other tests of this module).
    for a, _ in stack.gwf_accounts:
        stack.wait_for(lambda: stack.hot(a).get("credited") == 100, timeout=30,
                       what="accounts back in redis")
