"""Rate limits and spending caps (issue 12, items 1 and 2).

Rate limits are GCRA buckets in the account's limits hash (pg:{A}:lim),
checked in reserve.lua's call: per (key, route) from the routes file's
"rate" (or the key's own limit) and per account (PUT .../limits). Caps count
the points charged per UTC day and month, per account and per key; a call
that would pass one is refused before the device API sees it, and a failed
call gives its share back. Both hold across gateways because both live in
Redis, in the one script call that also holds the price.
"""
import json
import threading
import time

import harness
from harness import FINANCE_TOKEN, http

RATED = {
    "charge_on": ["2xx"],
    "routes": [
        {"id": "device.read", "method": "GET", "path": "/v1/devices/*", "price": 1,
         "rate": {"quota": 3, "window_s": 2}},
        {"id": "device.command", "method": "POST", "path": "/v1/devices/*/commands", "price": 5},
    ],
}


def _auth(key):
    return {"X-Api-Key": key}


def _base(stack):
    for p in getattr(stack, "limit_gateways", []):
        if p.alive():
            p.stop()
    stack.limit_gateways = []
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    http("POST", stack.devsim.url + "/_sim/reset")


def _gateway(stack, routes=RATED, env=None):
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(routes)}
    e.update(env or {})
    p = stack.spawn("gateway-limits", [stack.bin("gateway")], e, port)
    stack.limit_gateways.append(p)
    return p


def _sim_requests(stack):
    return http("GET", stack.devsim.url + "/_sim/stats").json()["requests"]


def _account(stack, points):
    acct, key = stack.new_account(points)
    stack.wait_for(lambda: stack.hot(acct).get("credited") == points, timeout=15,
                   what="credit in redis")
    return acct, key


def _put_limits(stack, acct, body):
    r = stack.admin("PUT", f"/v1/accounts/{acct}/limits", body)
    assert r.status == 200, r
    assert r.json()["applied"] is True, r
    return r.json()


def _command(url, key, i, status=None):
    h = _auth(key)
    if status:
        h["X-Sim-Status"] = str(status)
    return http("POST", url + f"/v1/devices/d{i}/commands", {"op": "unlock"}, h)


def test_route_rate_limit_answers_429_with_ratelimit_headers(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack, 100)
    before = _sim_requests(stack)
    answers = [http("GET", gw.url + f"/v1/devices/r{i}", headers=_auth(key)) for i in range(4)]
    assert [r.status for r in answers[:3]] == [200, 200, 200], answers
    ok = answers[0]
    assert ok.headers.get("ratelimit-policy") == '"limit";q=3;w=2', ok.headers
    assert ok.headers.get("ratelimit", "").startswith('"limit";r='), ok.headers
    r = answers[3]
    assert r.status == 429, r
    body = r.json()
    assert body["error"] == "rate_limited" and body["limit"] == {"quota": 3, "window_s": 2}, body
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 2, r.headers
    assert r.headers.get("ratelimit-policy") == '"limit";q=3;w=2', r.headers
    assert r.headers.get("ratelimit", "").startswith('"limit";r=0;t='), r.headers
    assert r.headers.get("x-points-charged") == "0"
    # Not proxied and free: three calls reached the device API, three points.
    assert _sim_requests(stack) == before + 3
    stack.wait_for(lambda: stack.hot(acct).get("spent") == 3, what="3 points spent")
    assert stack.hot(acct).get("held", 0) == 0
    # A route without a rate is not limited by another route's bucket.
    assert _command(gw.url, key, 0).status == 202
    # One call's worth of the window later (2 s / 3), one more passes.
    time.sleep(0.75)
    assert http("GET", gw.url + "/v1/devices/again", headers=_auth(key)).status == 200
    gw.stop()


def test_account_rate_limit_holds_across_two_gateways(stack):
    _base(stack)
    a, b = _gateway(stack), _gateway(stack)
    acct, key = _account(stack, 1000)
    # 10 calls per minute: a burst of 10, then one every 6 s, far longer
    # than the test's calls take.
    _put_limits(stack, acct, {"rate": {"quota": 10, "window_s": 60}})
    statuses, lock = [], threading.Lock()

    def worker(t):
        for j in range(8):
            gw = a if (t + j) % 2 else b
            r = _command(gw.url, key, t * 100 + j)
            with lock:
                statuses.append((r.status, r.json().get("error")))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [s for s in statuses if s[0] == 202]
    limited = [s for s in statuses if s[0] == 429]
    assert len(ok) == 10, statuses
    assert len(limited) == 30 and all(e == "rate_limited" for _, e in limited), statuses
    stack.wait_for(lambda: stack.hot(acct).get("spent") == 50, what="50 points spent")
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    assert stack.scalar(f"select count(*) from charges where account_id = {acct} "
                        "and amount > 0") == "10"
    # Lifting the limit (PUT without rate) lets calls through at once.
    _put_limits(stack, acct, {})
    assert _command(a.url, key, 999).status == 202
    a.stop()
    b.stop()


def test_daily_cap_is_never_exceeded_by_concurrent_calls_on_two_gateways(stack):
    _base(stack)
    a, b = _gateway(stack), _gateway(stack)
    acct, key = _account(stack, 100000)
    _put_limits(stack, acct, {"daily_cap": 52})
    before = _sim_requests(stack)
    results, lock = [], threading.Lock()

    def worker(t):
        for j in range(6):
            gw = a if (t + j) % 2 else b
            h = _auth(key)
            h["X-Sim-Delay-Ms"] = "30"  # calls overlap: caps count holds too
            r = http("POST", gw.url + f"/v1/devices/c{t}-{j}/commands", {"op": "x"}, h)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status == 202]
    refused = [r for r in results if r.status == 429]
    assert len(ok) == 10, [r.status for r in results]  # 10 x 5 = 50 <= 52 < 55
    assert len(ok) + len(refused) == len(results)
    body = refused[0].json()
    assert body["error"] == "quota_exceeded" and body["cap"] == 52, body
    assert body["period"] == "day" and body["cost"] == 5, body
    assert body["resets_at"].endswith("T00:00:00Z"), body
    assert refused[0].headers.get("x-points-charged") == "0"
    assert _sim_requests(stack) == before + 10  # refused calls never reached it
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    assert stack.scalar(f"select spent from accounts where id = {acct}") == "50"
    lim = stack.redis_raw("HGETALL", f"pg:{{{acct}}}:lim").splitlines()
    lim = dict(zip(lim[::2], lim[1::2]))
    assert lim["a.ds"] == "50" and lim["a.dh"] == "0", lim
    a.stop()
    b.stop()


def test_failed_calls_give_their_cap_share_back(stack):
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack, 1000)
    _put_limits(stack, acct, {"daily_cap": 10, "monthly_cap": 1000})
    # Failed calls cost nothing, so they take nothing from the cap.
    for i in range(5):
        r = _command(gw.url, key, i, status=503)
        assert r.status == 503 and r.headers.get("x-points-charged") == "0", r
    assert _command(gw.url, key, 10).status == 202
    assert _command(gw.url, key, 11).status == 202
    r = _command(gw.url, key, 12)
    assert r.status == 429 and r.json()["error"] == "quota_exceeded", r
    assert r.json()["remaining"] == 0
    # The balance shows the caps: spent, remaining, when they reset.
    bal = http("GET", gw.url + "/_billing/balance", headers=_auth(key))
    assert bal.status == 200, bal
    caps = bal.json()["caps"]["account"]
    assert caps["daily"]["cap"] == 10 and caps["daily"]["spent"] + caps["daily"]["held"] == 10
    assert caps["daily"]["remaining"] == 0, caps
    assert caps["monthly"]["cap"] == 1000 and caps["monthly"]["remaining"] == 990, caps
    assert caps["monthly"]["resets_at"][8:] == "01T00:00:00Z", caps
    gw.stop()


def test_limited_accounts_are_served_without_leases(stack):
    """A lease would let a gateway spend points without reserve.lua's
    checks; an account under limits never gets one, so its cap is exact
    even on a gateway that leases."""
    _base(stack)
    gw = _gateway(stack, routes=harness.DEFAULT_ROUTES,
                  env={"GATEWAY_LEASE_CALLS": "8", "GATEWAY_LEASE_IDLE_MS": "1000"})
    free_acct, free_key = _account(stack, 10000)
    acct, key = _account(stack, 10000)
    _put_limits(stack, acct, {"daily_cap": 23})
    for i in range(12):
        assert http("GET", gw.url + f"/v1/devices/f{i}", headers=_auth(free_key)).status == 200
    assert any(f"{{{free_acct}}}" in k for k in stack.leases()), stack.leases()
    codes = [_command(gw.url, key, i).status for i in range(6)]
    assert codes == [202, 202, 202, 202, 429, 429], codes
    assert not any(f"{{{acct}}}" in k for k in stack.leases()), stack.leases()
    stack.wait_for(lambda: stack.hot(acct).get("spent") == 20, what="20 spent")
    gw.stop()


def test_limits_api_and_cli_round_trip_and_refuse_bad_input(stack):
    _base(stack)
    acct, _ = _account(stack, 10)
    got = stack.admin("GET", f"/v1/accounts/{acct}/limits")
    assert got.status == 200 and got.json() == {"rate": None, "daily_cap": None,
                                                 "monthly_cap": None, "account_id": acct}, got
    _put_limits(stack, acct, {"rate": {"quota": 5, "window_s": 1}, "daily_cap": 100})
    bad = [
        ("not json", "{"),
        ("a list", [1]),
        ("unknown field", {"daily": 5}),
        ("zero cap", {"daily_cap": 0}),
        ("negative cap", {"monthly_cap": -1}),
        ("float cap", {"daily_cap": 1.5}),
        ("string cap", {"daily_cap": "100"}),
        ("huge cap", {"daily_cap": 2 ** 60}),
        ("rate without window", {"rate": {"quota": 5}}),
        ("rate zero", {"rate": {"quota": 0, "window_s": 1}}),
        ("rate window too long", {"rate": {"quota": 1, "window_s": 86401}}),
        ("rate extra field", {"rate": {"quota": 1, "window_s": 1, "burst": 3}}),
    ]
    for what, body in bad:
        raw = body if isinstance(body, str) else json.dumps(body)
        r = http("PUT", stack.admin_url + f"/v1/accounts/{acct}/limits", raw,
                 {"Authorization": f"Bearer {harness.ADMIN_TOKEN}",
                  "Content-Type": "application/json"})
        assert r.status == 400 and r.json()["error"] == "bad_request", (what, r)
    r = stack.admin("PUT", f"/v1/accounts/{acct}/limits", {"daily_cap": 1}, token=FINANCE_TOKEN)
    assert r.status == 403, r
    assert stack.admin("PUT", "/v1/accounts/999999/limits", {"daily_cap": 1}).status == 404
    assert stack.admin("PUT", "/v1/keys/999999/limits", {"daily_cap": 1}).status == 404
    assert stack.admin("POST", f"/v1/accounts/{acct}/limits", {}).status == 405
    # Nothing of the refused calls changed the settings.
    got = stack.admin("GET", f"/v1/accounts/{acct}/limits").json()
    assert got["rate"] == {"quota": 5, "window_s": 1} and got["daily_cap"] == 100, got
    assert stack.admin("GET", f"/v1/accounts/{acct}/limits", token=FINANCE_TOKEN).status == 200
    # The CLI changes only what it names.
    p = stack.run_billing("limits", "set", "--account", str(acct), "--monthly-cap", "500",
                          "--json")
    out = json.loads(p.stdout)
    assert out["monthly_cap"] == 500 and out["daily_cap"] == 100, out
    assert out["rate"] == {"quota": 5, "window_s": 1}, out
    p = stack.run_billing("limits", "set", "--account", str(acct), "--rate", "none")
    assert "rate         none" in p.stdout, p.stdout
    p = stack.run_billing("limits", "show", "--account", str(acct), "--json")
    assert json.loads(p.stdout)["rate"] is None
    for argv in (["limits", "set", "--account", str(acct), "--rate", "5"],
                 ["limits", "set", "--account", str(acct), "--daily-cap", "-3"],
                 ["limits", "set", "--account", str(acct)],
                 ["limits", "show"],
                 ["limits", "show", "--account", str(acct), "--key", "1"]):
        p = stack.run_billing(*argv, check=False)
        assert p.returncode == 2, (argv, p.returncode, p.stderr)
    p = stack.run_billing("limits", "show", "--account", "999999", check=False)
    assert p.returncode == 3, p.stderr
    lim = stack.redis_raw("HGETALL", f"pg:{{{acct}}}:lim").splitlines()
    lim = dict(zip(lim[::2], lim[1::2]))
    assert lim.get("a.cd") == "100" and lim.get("a.cm") == "500" and "a.rq" not in lim, lim
    # No limits left: the account is no longer "limited" (leases again).
    stack.run_billing("limits", "set", "--account", str(acct), "--daily-cap", "none",
                      "--monthly-cap", "none")
    assert "limited" not in stack.hot(acct)


def test_repair_pass_restores_lost_limits(stack):
    """The limits hash lost (or never written: Redis was away during the
    PUT) comes back with the next repair pass, from Postgres."""
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack, 1000)
    _put_limits(stack, acct, {"daily_cap": 10})
    stack.redis_raw("DEL", f"pg:{{{acct}}}:lim")
    stack.redis_raw("HDEL", f"pg:{{{acct}}}:acct", "limited")
    stack.wait_for(lambda: stack.redis_raw("HGET", f"pg:{{{acct}}}:lim", "a.cd") == "10",
                   timeout=15, what="limits pushed again by the repair pass")
    assert stack.hot(acct).get("limited") == 1
    codes = [_command(gw.url, key, i).status for i in range(3)]
    assert codes == [202, 202, 429], codes
    gw.stop()


def test_caps_and_buckets_survive_restarts_of_redis_gateway_and_billing(stack):
    """Counters and buckets live in Redis (appendonly, as the stack runs
    it): a Redis restart keeps them, and so do restarts of a gateway and of
    billing, which hold none of them."""
    _base(stack)
    gw = _gateway(stack)
    acct, key = _account(stack, 1000)
    _put_limits(stack, acct, {"daily_cap": 15, "rate": {"quota": 100, "window_s": 3600}})
    assert _command(gw.url, key, 1).status == 202
    stack.service("redis-stop")
    stack.service("redis-start")
    stack.wait_for(lambda: _command(gw.url, key, 2).status == 202, timeout=20,
                   what="served again after the Redis restart")
    gw.stop()
    gw = _gateway(stack)
    assert stack.billing.stop() == 0
    stack.start_billing()
    r = _command(gw.url, key, 3)
    assert r.status == 202, r  # 15 of 15
    r = _command(gw.url, key, 4)
    assert r.status == 429 and r.json()["error"] == "quota_exceeded", r
    lim = stack.redis_raw("HGETALL", f"pg:{{{acct}}}:lim").splitlines()
    lim = dict(zip(lim[::2], lim[1::2]))
    assert int(lim["a.ds"]) + int(lim["a.dh"]) == 15, lim
    gw.stop()
