"""Balance alerts and webhooks (issue 12, item 4), against a real receiver.

Billing writes an event in the transaction of the change it reports (a
credit, a key revoke, a threshold crossing) with one delivery row per
endpoint, and its webhook thread sends them with libcurl, signed in the
Standard Webhooks style, retrying with backoff for WEBHOOK_RETRY_HORIZON_S.
The receiver here is a real HTTP server in the test process whose behaviour
each test sets per path (answer 2xx, 500 a number of times, or sleep).
"""
import base64
import hashlib
import hmac
import http.server as httpserver
import json
import threading
import time

import harness
from harness import FINANCE_TOKEN, http

# Short backoff and horizon: a retry in 0.2 s, 0.4 s, 0.8 s..., given up
# after 3 s; the watcher every 100 ms.
WEBHOOK_ENV = {"WEBHOOK_RETRY_BASE_MS": "200", "WEBHOOK_RETRY_MAX_MS": "1000",
               "WEBHOOK_RETRY_HORIZON_S": "3", "WEBHOOK_WATCH_INTERVAL_MS": "100",
               "WEBHOOK_TIMEOUT_MS": "5000", "WEBHOOK_CONSUMER": "billing-test"}


class Receiver:
    """A webhook receiver: records every request; BEHAVE[path] is
    ("ok",), ("fail", n) (500 the first n times), ("slow", seconds) or
    ("always", status)."""

    def __init__(self):
        self.requests = []
        self.behave = {}
        self.counts = {}
        self.lock = threading.Lock()
        rec = self

        class H(httpserver.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with rec.lock:
                    rec.requests.append({"path": self.path, "headers": dict(self.headers),
                                         "body": body, "at": time.time()})
                    rec.counts[self.path] = rec.counts.get(self.path, 0) + 1
                    seen = rec.counts[self.path]
                    how = rec.behave.get(self.path, ("ok",))
                status = 200
                if how[0] == "fail" and seen <= how[1]:
                    status = 500
                elif how[0] == "always":
                    status = how[1]
                elif how[0] == "slow":
                    time.sleep(how[1])
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.server = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, path, type_=None):
        with self.lock:
            out = [r for r in self.requests if r["path"] == path]
        out = [dict(r, json=json.loads(r["body"])) for r in out]
        return [r for r in out if type_ is None or r["json"]["type"] == type_]


def _base(stack, env=None):
    if not hasattr(stack, "receiver"):
        stack.receiver = Receiver()
    if stack.devsim is None:
        stack.start_devsim()
    if getattr(stack, "wh_billing", None) is None or not stack.billing.alive():
        if stack.billing is not None and stack.billing.alive():
            stack.billing.stop()
        e = dict(WEBHOOK_ENV)
        e.update(env or {})
        stack.start_billing(e)
        stack.wh_billing = stack.billing
        harness.wait_port(stack.billing.port)
    return stack.receiver


def _endpoint(stack, acct, path):
    r = stack.admin("POST", f"/v1/accounts/{acct}/webhooks", {"url": stack.receiver.url(path)})
    assert r.status == 201 and r.body[:1] == b"{", (r, r.headers, r.body)
    return r.json()


def _verify(secret, req):
    """The Standard Webhooks check a receiver makes: HMAC-SHA256 over
    id.timestamp.body with the secret's decoded bytes."""
    h = {k.lower(): v for k, v in req["headers"].items()}
    key = base64.b64decode(secret[len("whsec_"):])
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + req["body"]
    want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sigs = [s.split(",", 1)[1] for s in h["webhook-signature"].split(" ")]
    return want in sigs and abs(time.time() - int(h["webhook-timestamp"])) < 300


def _topup(stack, acct, amount, ref=None, replay=False):
    r = stack.admin("POST", f"/v1/accounts/{acct}/topups",
                    {"amount": amount, "reference": ref or f"wh-{time.time_ns()}"})
    assert r.status == (200 if replay else 201), r
    return r.json()


def test_endpoint_secret_is_shown_once_and_bad_input_changes_nothing(stack):
    _base(stack)
    acct, _ = stack.new_account(0)
    ep = _endpoint(stack, acct, "/once")
    assert ep["secret"].startswith("whsec_") and len(ep["secret"]) == 50, ep
    assert base64.b64decode(ep["secret"][6:]) and ep["url"].endswith("/once")
    listed = stack.admin("GET", f"/v1/accounts/{acct}/webhooks").json()["webhooks"]
    assert [w["id"] for w in listed] == [ep["id"]]
    assert "secret" not in json.dumps(listed) and ep["secret"] not in json.dumps(listed)
    # Stored sealed: neither the secret nor its bytes are in the row.
    stored = stack.scalar(f"SELECT encode(secret_enc, 'hex') FROM webhook_endpoints "
                          f"WHERE id = {ep['id']}")
    assert ep["secret"].encode().hex() not in stored
    assert base64.b64decode(ep["secret"][6:]).hex() not in stored
    # Finance reads, never writes.
    r = stack.admin("POST", f"/v1/accounts/{acct}/webhooks", {"url": "http://x.example/"},
                    token=FINANCE_TOKEN)
    assert r.status == 403, r
    assert stack.admin("GET", f"/v1/accounts/{acct}/webhooks", token=FINANCE_TOKEN).status == 200
    for bad in [{"url": "ftp://x.example/"}, {"url": "http://user:pw@x.example/"},
                {"url": "http://x.example/#f"}, {"url": "http:// x/"}, {"url": 5}, {},
                {"url": "http://" + "a" * 3000}, {"url": "http://x.example:99999/"},
                {"url": "http://x.example/", "enabled": "yes"}]:
        r = stack.admin("POST", f"/v1/accounts/{acct}/webhooks", bad)
        assert r.status == 400 and r.json()["error"] == "bad_request", (bad, r)
    assert stack.admin("POST", "/v1/accounts/999999/webhooks",
                       {"url": "http://x.example/"}).status == 404
    for i in range(9):
        _endpoint(stack, acct, f"/more{i}")
    r = stack.admin("POST", f"/v1/accounts/{acct}/webhooks", {"url": "http://x.example/"})
    assert r.status == 409 and r.json()["error"] == "too_many_webhooks", r
    assert stack.scalar(f"SELECT count(*) FROM webhook_endpoints WHERE account_id = {acct}") == "10"
    assert stack.admin("DELETE", f"/v1/webhooks/{ep['id']}").status == 204
    assert stack.admin("DELETE", f"/v1/webhooks/{ep['id']}").status == 404


def test_credits_and_revokes_are_delivered_signed(stack):
    rec = _base(stack)
    acct, _ = stack.new_account(0)
    ep = _endpoint(stack, acct, "/signed")
    entry = _topup(stack, acct, 700, "order-1")
    r = stack.admin("POST", f"/v1/accounts/{acct}/adjustments", {"amount": -200, "reason": "refund"})
    assert r.status == 201, r
    # A replayed top-up (same reference) is no new credit and no new event.
    _topup(stack, acct, 700, "order-1", replay=True)
    key = stack.admin("POST", f"/v1/accounts/{acct}/keys", {"name": "ci"}).json()
    assert stack.admin("DELETE", f"/v1/keys/{key['key_id']}").status in (200, 204)
    stack.wait_for(lambda: len(rec.events("/signed")) >= 3, what="three deliveries")
    time.sleep(0.5)
    got = rec.events("/signed")
    assert [g["json"]["type"] for g in got] == ["topup.created", "adjustment.created",
                                               "key.revoked"], got
    for g in got:
        assert _verify(ep["secret"], g), g["headers"]
        assert g["headers"]["webhook-id"] == g["json"]["id"]
        assert g["headers"]["Content-Type"] == "application/json"
    t, a, k = (g["json"]["data"] for g in got)
    assert t["amount"] == 700 and t["reference"] == "order-1" and t["balance"] == 700, t
    assert t["entry_id"] == entry["id"] and t["account_id"] == acct
    assert a["amount"] == -200 and a["reason"] == "refund" and a["balance"] == 500, a
    assert k["key_id"] == key["key_id"] and k["name"] == "ci" and "api_key" not in k, k
    # A tampered body or another secret does not verify.
    bad = dict(got[0], body=got[0]["body"].replace(b"700", b"701"))
    assert not _verify(ep["secret"], bad)
    other = stack.admin("POST", f"/v1/accounts/{acct}/webhooks",
                        {"url": rec.url("/other")}).json()
    assert not _verify(other["secret"], got[0])
    # Revoking again revokes nothing new: no second key.revoked.
    stack.admin("DELETE", f"/v1/keys/{key['key_id']}")
    time.sleep(0.8)
    assert len(rec.events("/signed", "key.revoked")) == 1
    assert rec.events("/other", "key.revoked") == []


def test_a_failing_receiver_gets_retries_with_the_same_id_then_it_is_delivered(stack):
    rec = _base(stack)
    acct, _ = stack.new_account(0)
    rec.behave["/flaky"] = ("fail", 2)
    ep = _endpoint(stack, acct, "/flaky")
    _topup(stack, acct, 10)
    stack.wait_for(lambda: len(rec.events("/flaky")) >= 3, timeout=10, what="three attempts")
    got = rec.events("/flaky")
    assert len({g["headers"]["webhook-id"] for g in got}) == 1
    assert all(_verify(ep["secret"], g) for g in got)
    # Backoff: the second attempt waits about 0.2 s, the third about 0.4 s.
    gaps = [got[i + 1]["at"] - got[i]["at"] for i in range(2)]
    assert 0.1 < gaps[0] < 1.0 and gaps[1] > gaps[0] * 1.2, gaps

    def delivered():
        d = stack.admin("GET", f"/v1/webhooks/{ep['id']}/deliveries").json()["deliveries"]
        return d if d and d[0]["state"] == "delivered" else None

    d = stack.wait_for(delivered, what="delivered state")[0]
    assert d["attempts"] == 3 and d["type"] == "topup.created", d
    assert [a["status"] for a in d["attempt_log"]] == [500, 500, 200], d
    assert d["attempt_log"][0]["response"] == "ok"
    time.sleep(0.8)
    assert len(rec.events("/flaky")) == 3


def test_retries_stop_at_the_horizon_and_a_replay_sends_again(stack):
    rec = _base(stack)
    acct, _ = stack.new_account(0)
    rec.behave["/down"] = ("always", 503)
    ep = _endpoint(stack, acct, "/down")
    _topup(stack, acct, 10)

    def state():
        d = stack.admin("GET", f"/v1/webhooks/{ep['id']}/deliveries").json()["deliveries"]
        return d[0] if d and d[0]["state"] == "failed" else None

    d = stack.wait_for(state, timeout=15, what="given up after the horizon")
    assert 3 <= d["attempts"] <= 8 and d["last_status"] == 503, d
    n = len(rec.events("/down"))
    time.sleep(1.5)
    assert len(rec.events("/down")) == n, "no attempt after giving up"
    rec.behave["/down"] = ("ok",)
    r = stack.admin("POST", f"/v1/events/{d['event_id']}/replay")
    assert r.status == 202 and r.json()["deliveries"] == 1, r
    stack.wait_for(lambda: len(rec.events("/down")) == n + 1, what="the replay")
    assert rec.events("/down")[-1]["headers"]["webhook-id"] == d["event_id"]
    stack.wait_for(lambda: stack.admin("GET", f"/v1/webhooks/{ep['id']}/deliveries")
                   .json()["deliveries"][0]["state"] == "delivered", what="delivered")
    # Unknown or malformed event ids, finance replays: refused, nothing sent.
    assert stack.admin("POST", "/v1/events/00000000-0000-0000-0000-000000000000/replay"
                       ).status == 404
    assert stack.admin("POST", "/v1/events/nope/replay").status == 404
    assert stack.admin("POST", f"/v1/events/{d['event_id']}/replay",
                       token=FINANCE_TOKEN).status == 403
    r = stack.admin("GET", f"/v1/webhooks/{ep['id']}/deliveries?limit=0")
    assert r.status == 400, r
    time.sleep(0.5)
    assert len(rec.events("/down")) == n + 1


def _spend(stack, gw, key, calls):
    for i in range(calls):
        r = http("POST", gw.url + f"/v1/devices/d{i}/commands", {"op": "x"}, {"X-Api-Key": key})
        assert 200 <= r.status < 300, r


def test_balance_low_fires_once_per_crossing_and_a_credit_arms_it_again(stack):
    rec = _base(stack)
    gw = stack.gateway if stack.gateway and stack.gateway.alive() else stack.start_gateway()
    harness.wait_port(gw.port)
    acct, key = stack.new_account_in_redis(100)
    _endpoint(stack, acct, "/low")
    r = stack.admin("PUT", f"/v1/accounts/{acct}/alerts", {"thresholds": [60, 30]})
    assert r.status == 200, r
    assert [t["state"] for t in r.json()["thresholds"]] == ["armed", "armed"], r
    _spend(stack, gw, key, 9)  # 100 - 45 = 55: below 60 only
    stack.wait_for(lambda: rec.events("/low", "balance.low"), what="balance.low at 60")
    time.sleep(0.6)
    low = rec.events("/low", "balance.low")
    assert [e["json"]["data"]["threshold"] for e in low] == [60], low
    assert low[0]["json"]["data"]["balance"] == 55
    _spend(stack, gw, key, 1)  # 50: still below 60, above 30: nothing new
    time.sleep(0.8)
    assert len(rec.events("/low", "balance.low")) == 1
    st = stack.admin("GET", f"/v1/accounts/{acct}/alerts").json()
    assert {t["threshold"]: t["state"] for t in st["thresholds"]} == {60: "fired", 30: "armed"}
    _topup(stack, acct, 50)  # 100: above 60 again, armed
    stack.wait_for(lambda: stack.admin("GET", f"/v1/accounts/{acct}/alerts").json()
                   ["thresholds"][0]["state"] == "armed", what="armed again")
    stack.wait_for(lambda: stack.hot(acct).get("credited") == 150, what="credit in redis")
    _spend(stack, gw, key, 9)  # 55
    stack.wait_for(lambda: len(rec.events("/low", "balance.low")) == 2, what="second crossing")
    _spend(stack, gw, key, 11)  # 0: below 30, and exhausted
    stack.wait_for(lambda: rec.events("/low", "balance.exhausted"), what="balance.exhausted")
    time.sleep(0.8)
    low = [e["json"]["data"]["threshold"] for e in rec.events("/low", "balance.low")]
    assert low == [60, 60, 30], low
    assert len(rec.events("/low", "balance.exhausted")) == 1
    # Bad settings: refused, nothing changed.
    for bad in [{"thresholds": [0]}, {"thresholds": [5, 5]}, {"thresholds": "x"}, {},
                {"thresholds": list(range(1, 12))}, {"thresholds": [1], "extra": 1},
                {"thresholds": [1], "exhausted_below": -1}]:
        r = stack.admin("PUT", f"/v1/accounts/{acct}/alerts", bad)
        assert r.status == 400, (bad, r)
    assert len(stack.admin("GET", f"/v1/accounts/{acct}/alerts").json()["thresholds"]) == 2


def test_a_slow_receiver_delays_neither_calls_nor_other_endpoints(stack):
    rec = _base(stack)
    gw = stack.gateway if stack.gateway and stack.gateway.alive() else stack.start_gateway()
    harness.wait_port(gw.port)
    acct, key = stack.new_account_in_redis(10000)
    rec.behave["/slow"] = ("slow", 4)
    _endpoint(stack, acct, "/slow")
    other, _ = stack.new_account(0)
    _endpoint(stack, other, "/fast")
    for _ in range(20):
        _topup(stack, acct, 1)
    stack.wait_for(lambda: len(rec.events("/slow")) >= 10, what="slow attempts in flight")
    t0 = time.time()
    _topup(stack, other, 5)
    stack.wait_for(lambda: rec.events("/fast"), timeout=3, what="the fast endpoint's event")
    fast_after = time.time() - t0
    worst = 0.0
    for i in range(30):
        t = time.time()
        r = http("GET", gw.url + f"/v1/devices/s{i}", headers={"X-Api-Key": key})
        worst = max(worst, time.time() - t)
        assert r.status == 200, r
    assert fast_after < 2.0, fast_after
    assert worst < 1.0, worst
    m = http("GET", stack.billing.ops_url + "/metrics").body.decode()
    assert "pointgate_billing_webhook_in_flight" in m
    rec.behave["/slow"] = ("ok",)


def test_billing_killed_mid_delivery_loses_no_event(stack):
    rec = _base(stack)
    acct, _ = stack.new_account(0)
    rec.behave["/crash"] = ("slow", 3)
    _endpoint(stack, acct, "/crash")
    ids = []
    for i in range(15):
        ids.append(_topup(stack, acct, 1 + i)["id"])
    stack.wait_for(lambda: rec.events("/crash"), what="attempts in flight")
    stack.billing.kill9()
    # Written while billing is down: through the CLI, in Postgres only.
    for i in range(3):
        stack.run_billing("topup", str(acct), "2", "--reference", f"down-{i}")
    rec.behave["/crash"] = ("ok",)
    stack.wh_billing = None
    _base(stack)
    harness.wait_port(stack.billing.port)

    def all_in():
        got = {e["json"]["data"]["entry_id"] for e in rec.events("/crash", "topup.created")}
        return len(got) == 18 and got

    got = stack.wait_for(all_in, timeout=20, what="every event delivered")
    assert set(ids) <= got
    rows = stack.psql(f"SELECT d.state FROM webhook_deliveries d JOIN webhook_endpoints w "
                      f"ON w.id = d.endpoint_id WHERE w.account_id = {acct}")
    stack.wait_for(lambda: all(r[0] == "delivered" for r in stack.psql(
        f"SELECT d.state FROM webhook_deliveries d JOIN webhook_endpoints w "
        f"ON w.id = d.endpoint_id WHERE w.account_id = {acct}")), what="all delivered")
    assert len(rows) == 18


def test_cli_webhooks_and_alerts(stack):
    rec = _base(stack)
    acct, _ = stack.new_account(0)
    p = stack.run_billing("webhooks", "add", str(acct), rec.url("/cli"))
    ep = json.loads(p.stdout)
    assert ep["secret"].startswith("whsec_")
    p = stack.run_billing("webhooks", "list", str(acct))
    assert ep["secret"] not in p.stdout and json.loads(p.stdout)["webhooks"][0]["id"] == ep["id"]
    p = stack.run_billing("alerts", "set", str(acct), "--thresholds", "500,50",
                          "--exhausted-below", "5")
    st = json.loads(p.stdout)
    assert [t["threshold"] for t in st["thresholds"]] == [500, 50] and st["exhausted_below"] == 5
    _topup(stack, acct, 1000)
    stack.wait_for(lambda: rec.events("/cli", "topup.created"), what="delivery")
    p = stack.run_billing("webhooks", "deliveries", str(ep["id"]))
    d = json.loads(p.stdout)["deliveries"]
    assert d and d[0]["type"] == "topup.created"
    p = stack.run_billing("webhooks", "replay", d[0]["event_id"])
    assert json.loads(p.stdout)["deliveries"] == 1
    stack.wait_for(lambda: len(rec.events("/cli", "topup.created")) == 2, what="replayed")
    for args, code in [(["webhooks", "add", str(acct), "ftp://x/"], 2),
                       (["webhooks", "add", "x", "http://x/"], 2),
                       (["webhooks", "remove", "999999"], 3),
                       (["webhooks", "replay", "nope"], 3),
                       (["alerts", "set", str(acct), "--thresholds", "a,b"], 2),
                       (["alerts", "set", str(acct), "--thresholds", "0"], 2),
                       (["alerts", "show", "999999"], 3), (["webhooks"], 2)]:
        p = stack.run_billing(*args, check=False)
        assert p.returncode == code and p.stderr.startswith("billing: ") or \
            (p.returncode == code and "usage" in p.stderr), (args, p.returncode, p.stderr)
    p = stack.run_billing("webhooks", "remove", str(ep["id"]))
    assert p.returncode == 0
    assert stack.run_billing("webhooks", "list", str(acct)).stdout.count('"id"') == 0
