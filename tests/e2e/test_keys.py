"""Key management (issue 12, item 5): names, expiries, route scopes,
listing without secrets, rotation with a grace period, and revocation of a
key with its predecessors, on two gateways.

A key's mirror in Redis (pg:key:<hash>) is "account|key id|version|expires
ms|scopes": each gateway checks the expiry on every call against its clock
and the scopes against the matched route, so an expiry takes effect at its
second on every gateway, with no lookup; a revoke through the tombstone
within the auth cache's 1 s.
"""
import datetime
import hashlib
import json
import threading
import time

import harness
from harness import FINANCE_TOKEN, PEPPER, http


def _key_hash(api_key):
    pepper = hashlib.blake2b(PEPPER.encode(), digest_size=32).digest()
    return hashlib.blake2b(api_key.encode(), digest_size=32, key=pepper).hexdigest()


def _auth(key):
    return {"X-Api-Key": key}


def _base(stack):
    for p in getattr(stack, "key_gateways", []):
        if p.alive():
            p.stop()
    stack.key_gateways = []
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    http("POST", stack.devsim.url + "/_sim/reset")


def _gateway(stack):
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(harness.DEFAULT_ROUTES)}
    p = stack.spawn("gateway-keys", [stack.bin("gateway")], e, port)
    stack.key_gateways.append(p)
    return p


def _sim_requests(stack):
    return http("GET", stack.devsim.url + "/_sim/stats").json()["requests"]


def _account(stack, points):
    acct, _ = stack.new_account(points)
    stack.wait_for(lambda: stack.hot(acct).get("credited") == points, timeout=15,
                   what="credit in redis")
    return acct


def _new_key(stack, acct, body=None):
    r = stack.admin("POST", f"/v1/accounts/{acct}/keys", body)
    assert r.status == 201, r
    return r.json()


def _utc(seconds_from_now):
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(url, key, i=0):
    return http("GET", url + f"/v1/devices/k{i}", headers=_auth(key))


def _command(url, key, i=0):
    return http("POST", url + f"/v1/devices/k{i}/commands", {"op": "x"}, _auth(key))


def test_create_with_name_expiry_scopes_and_list_without_secrets(stack):
    _base(stack)
    acct = _account(stack, 100)
    exp = _utc(3600)
    made = _new_key(stack, acct, {"name": "door sensor 7", "expires_at": exp,
                                  "scopes": ["device.read", "device.batch"]})
    assert made["name"] == "door sensor 7" and made["expires_at"] == exp, made
    assert made["scopes"] == ["device.read", "device.batch"] and made["state"] == "active"
    assert made["api_key"].startswith("pgk_") and made["hint"] == made["api_key"][-4:]
    plain = _new_key(stack, acct)
    assert plain["name"] is None and plain["scopes"] is None and plain["expires_at"] is None
    r = stack.admin("GET", f"/v1/accounts/{acct}/keys", token=FINANCE_TOKEN)
    assert r.status == 200, r
    listed = r.json()["keys"]
    assert [k["key_id"] for k in listed] == [k["key_id"] for k in
                                             sorted(listed, key=lambda k: k["key_id"])]
    ids = {k["key_id"] for k in listed}
    assert made["key_id"] in ids and plain["key_id"] in ids
    text = r.body.decode()
    for k in (made, plain):
        assert k["api_key"] not in text and _key_hash(k["api_key"]) not in text
    assert "api_key" not in text and "key_hash" not in text
    # Paging: one at a time, by the cursor.
    first = stack.admin("GET", f"/v1/accounts/{acct}/keys?limit=1").json()
    assert len(first["keys"]) == 1 and first["next_after"] == first["keys"][0]["key_id"]
    nxt = stack.admin("GET", f"/v1/accounts/{acct}/keys?limit=1&after={first['next_after']}")
    assert nxt.json()["keys"][0]["key_id"] > first["next_after"]
    # The CLI shows the same and never a secret either.
    p = stack.run_billing("keys", "list", str(acct), "--json")
    assert {k["key_id"] for k in json.loads(p.stdout)} == ids
    p = stack.run_billing("keys", "list", str(acct))
    assert "door sensor 7" in p.stdout and made["api_key"] not in p.stdout
    assert "device.read,device.batch" in p.stdout


def test_bad_key_settings_are_refused_and_change_nothing(stack):
    _base(stack)
    acct = _account(stack, 10)
    before = stack.scalar("select count(*) from api_keys")
    bad = [
        {"name": ""},
        {"name": "x" * 101},
        {"name": "tab\there"},
        {"name": 5},
        {"expires_at": "2020-01-01T00:00:00Z"},
        {"expires_at": "tomorrow"},
        {"expires_at": "2030-02-30T00:00:00Z"},
        {"expires_at": "2030-01-01T00:00:00+01:00"},
        {"scopes": []},
        {"scopes": ["device.read", "device.read"]},
        {"scopes": ["a b"]},
        {"scopes": ["_billing"]},
        {"scopes": [f"r{i}" for i in range(17)]},
        {"scopes": "device.read"},
        {"scope": ["device.read"]},
        [1, 2],
    ]
    for body in bad:
        r = stack.admin("POST", f"/v1/accounts/{acct}/keys", body)
        assert r.status == 400 and r.json()["error"] == "bad_request", (body, r)
    assert stack.scalar("select count(*) from api_keys") == before
    assert stack.admin("POST", "/v1/accounts/999999/keys", {"name": "x"}).status == 404
    assert stack.admin("GET", "/v1/accounts/999999/keys").status == 404
    assert stack.admin("GET", f"/v1/accounts/{acct}/keys?limit=0").status == 400
    assert stack.admin("GET", f"/v1/accounts/{acct}/keys?limit=1001").status == 400
    assert stack.admin("POST", f"/v1/accounts/{acct}/keys", {"name": "x"},
                       token=FINANCE_TOKEN).status == 403
    for argv in (["keys", "create", str(acct), "--expires-at", "2020-01-01T00:00:00Z"],
                 ["keys", "create", str(acct), "--scopes", "a,a"],
                 ["keys", "rotate", "1", "--grace", "-1"],
                 ["keys", "list"]):
        p = stack.run_billing(*argv, check=False)
        assert p.returncode == 2, (argv, p.returncode, p.stderr)
    assert stack.scalar("select count(*) from api_keys") == before


def test_expired_key_is_refused_on_every_gateway_at_its_second(stack):
    _base(stack)
    a, b = _gateway(stack), _gateway(stack)
    acct = _account(stack, 100)
    made = _new_key(stack, acct, {"expires_at": _utc(3)})
    key = made["api_key"]
    deadline = datetime.datetime.strptime(made["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    assert _read(a.url, key).status == 200 and _read(b.url, key).status == 200
    before = _sim_requests(stack)
    time.sleep(max(0, deadline - time.time()) + 0.05)
    for gw in (a, b):
        r = _read(gw.url, key, 1)
        assert r.status == 401 and r.json()["error"] == "key_expired", r
        assert r.headers.get("x-points-charged") in (None, "0")
    assert _sim_requests(stack) == before
    listed = stack.admin("GET", f"/v1/accounts/{acct}/keys").json()["keys"]
    assert [k["state"] for k in listed if k["key_id"] == made["key_id"]] == ["expired"]
    a.stop()
    b.stop()


def test_scopes_allow_their_routes_only_and_refusals_cost_nothing(stack):
    _base(stack)
    a, b = _gateway(stack), _gateway(stack)
    acct = _account(stack, 100)
    key = _new_key(stack, acct, {"scopes": ["device.read"]})["api_key"]
    before = _sim_requests(stack)
    assert _read(a.url, key).status == 200
    for gw in (a, b):
        r = _command(gw.url, key)
        assert r.status == 403 and r.json()["error"] == "route_not_allowed", r
        assert "device.command" in r.json()["message"]
    assert _sim_requests(stack) == before + 1
    stack.wait_for(lambda: stack.hot(acct).get("spent") == 1, what="one point spent")
    # The balance is any key's.
    assert http("GET", a.url + "/_billing/balance", headers=_auth(key)).status == 200
    # An unscoped key of the same account calls anything.
    other = _new_key(stack, acct)["api_key"]
    assert _command(b.url, other).status == 202
    a.stop()
    b.stop()


def test_rotation_keeps_the_old_key_for_its_grace_then_refuses_it(stack):
    _base(stack)
    a, b = _gateway(stack), _gateway(stack)
    acct = _account(stack, 100)
    old = _new_key(stack, acct, {"name": "hub", "scopes": ["device.read"]})
    r = stack.admin("POST", f"/v1/keys/{old['key_id']}/rotate", {"grace_s": 3})
    assert r.status == 201, r
    new = r.json()
    assert new["rotated_from"] == old["key_id"] and new["grace_s"] == 3
    assert new["name"] == "hub" and new["scopes"] == ["device.read"], new
    assert new["api_key"] != old["api_key"]
    # Both work during the grace, on both gateways.
    for gw in (a, b):
        assert _read(gw.url, old["api_key"]).status == 200
        assert _read(gw.url, new["api_key"]).status == 200
    # Rotating the old one again is refused: rotate its successor.
    again = stack.admin("POST", f"/v1/keys/{old['key_id']}/rotate", {})
    assert again.status == 409 and again.json()["error"] == "already_rotated", again
    listed = {k["key_id"]: k for k in stack.admin("GET", f"/v1/accounts/{acct}/keys").json()["keys"]}
    assert listed[old["key_id"]]["rotated_to"] == new["key_id"]
    deadline = datetime.datetime.strptime(listed[old["key_id"]]["expires_at"],
                                          "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    time.sleep(max(0, deadline - time.time()) + 0.05)
    for gw in (a, b):
        r = _read(gw.url, old["api_key"], 2)
        assert r.status == 401 and r.json()["error"] == "key_expired", r
        assert _read(gw.url, new["api_key"], 3).status == 200
    # A repair pass (every 3 s here) does not bring the old life back.
    time.sleep(3.5)
    assert _read(a.url, old["api_key"], 4).status == 401
    assert stack.admin("POST", f"/v1/keys/{old['key_id']}/rotate", {"grace_s": -1}).status == 400
    assert stack.admin("POST", f"/v1/keys/{old['key_id']}/rotate", {"grace": 5}).status == 400
    assert stack.admin("POST", "/v1/keys/999999/rotate", {}).status == 404
    a.stop()
    b.stop()


def test_revoke_during_grace_ends_both_keys_within_2s(stack):
    _base(stack)
    a, b = _gateway(stack), _gateway(stack)
    acct = _account(stack, 1000)
    old = _new_key(stack, acct)
    p = stack.run_billing("keys", "rotate", str(old["key_id"]), "--grace", "600", "--json")
    new = json.loads(p.stdout)
    assert new["api_key"].startswith("pgk_")
    for gw in (a, b):
        assert _read(gw.url, old["api_key"]).status == 200
        assert _read(gw.url, new["api_key"]).status == 200
    # Keep both keys busy on both gateways while the successor is revoked.
    stop, late = threading.Event(), []
    revoked_at = []

    def hammer(gw, key):
        while not stop.is_set():
            r = _read(gw.url, key, 5)
            if r.status == 200 and revoked_at and time.time() - revoked_at[0] > 2.0:
                late.append(r)

    threads = [threading.Thread(target=hammer, args=(gw, k["api_key"]))
               for gw in (a, b) for k in (old, new)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert stack.admin("DELETE", f"/v1/keys/{new['key_id']}").status == 204
    revoked_at.append(time.time())
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join()
    assert not late, late[:3]
    for gw in (a, b):
        for k in (old, new):
            r = _read(gw.url, k["api_key"], 6)
            assert r.status == 401 and r.json()["error"] == "unauthorized", r
    for k in (old, new):
        assert stack.redis_raw("GET", f"pg:key:{_key_hash(k['api_key'])}") == "-1"
    states = {k["key_id"]: k["state"]
              for k in stack.admin("GET", f"/v1/accounts/{acct}/keys").json()["keys"]}
    assert states[old["key_id"]] == "revoked" and states[new["key_id"]] == "revoked"
    a.stop()
    b.stop()


def test_mirror_lost_is_rebuilt_with_expiry_and_scopes(stack):
    """The repair pass writes a key's whole mirror back: after the value is
    lost (or rolled back to the old bare "account" form), expiry and
    scopes hold again within a pass."""
    _base(stack)
    gw = _gateway(stack)
    acct = _account(stack, 100)
    made = _new_key(stack, acct, {"scopes": ["device.read"], "expires_at": _utc(3600)})
    h = _key_hash(made["api_key"])
    value = stack.redis_raw("GET", f"pg:key:{h}")
    parts = value.split("|")
    assert parts[0] == str(acct) and parts[1] == str(made["key_id"]) and parts[4] == "device.read"
    stack.redis_raw("SET", f"pg:key:{h}", str(acct))  # the older form: no scopes known
    stack.wait_for(lambda: stack.redis_raw("GET", f"pg:key:{h}") == value, timeout=15,
                   what="mirror rewritten by the repair pass")
    time.sleep(1.1)  # the gateway's auth cache
    assert _command(gw.url, made["api_key"]).status == 403
    stack.redis_raw("DEL", f"pg:key:{h}")
    stack.wait_for(lambda: stack.redis_raw("GET", f"pg:key:{h}") == value, timeout=15,
                   what="mirror restored by the repair pass")
    gw.stop()


def test_key_limits_apply_to_that_key_only(stack):
    """Per-key limits need the key's id on every call (from the mirror)."""
    _base(stack)
    gw = _gateway(stack)
    acct = _account(stack, 1000)
    capped = _new_key(stack, acct, {"name": "test device"})
    free = _new_key(stack, acct)
    r = stack.admin("PUT", f"/v1/keys/{capped['key_id']}/limits", {"daily_cap": 12})
    assert r.status == 200 and r.json()["applied"] is True, r
    codes = [_command(gw.url, capped["api_key"], i).status for i in range(3)]
    assert codes == [202, 202, 429], codes
    assert _command(gw.url, free["api_key"], 9).status == 202
    bal = http("GET", gw.url + "/_billing/balance", headers=_auth(capped["api_key"])).json()
    assert bal["caps"]["key"]["daily"]["cap"] == 12, bal
    assert bal["caps"]["key"]["daily"]["remaining"] == 2, bal
    gw.stop()
