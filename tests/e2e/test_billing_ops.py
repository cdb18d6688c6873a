"""billing serve's ops listener (BILLING_OPS_LISTEN, billing/ops.c) and its
metrics (billing/metrics.c), on the real stack.

Proves: /metrics is valid Prometheus text (promtool check metrics) with the
right content type; counters move by exact amounts after top-ups,
adjustments, a settled batch of gateway calls, a dead letter, a sweeper
release and a repair fix; API requests are counted by endpoint template and
code (never the raw path); /readyz follows Redis and turns 503 "draining"
on SIGTERM before the process stops; /healthz answers 200 while every worker
turns; anything else is 404/405.
"""
import json
import re
import signal
import subprocess
import time
import uuid

from harness import http
from luahelp import Redis, holds_key, outbox_add

PROMTOOL = "/usr/bin/promtool"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _billing(stack, env=None):
    if stack.billing is None or not stack.billing.alive():
        stack.start_billing(env)
        stack.wait_for(lambda: _get(stack, "/readyz").status == 200, timeout=20,
                       what="billing ready")
    return stack.billing


def _get(stack, path, method="GET"):
    return http(method, stack.billing.ops_url + path, timeout=10)


def _scrape_text(stack):
    r = _get(stack, "/metrics")
    assert r.status == 200, r
    return r.body.decode()


def _scrape(stack):
    """{(name, ((label, value), ...)): float} of one scrape."""
    out = {}
    for line in _scrape_text(stack).splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def _v(sample, name, **labels):
    return sample.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_valid_prometheus_text(stack):
    _billing(stack)
    r = _get(stack, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", r.headers
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=r.body, capture_output=True,
                       timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    s = _scrape(stack)
    for name in ["pointgate_billing_outbox_backlog_records", "pointgate_billing_ready",
                 "pointgate_billing_postgres_up", "pointgate_billing_redis_up",
                 "process_resident_memory_bytes", "process_open_fds",
                 "pointgate_billing_settle_batch_duration_seconds_count",
                 "pointgate_billing_repair_pass_duration_seconds_count"]:
        assert any(k[0] == name for k in s), name
    assert _v(s, "pointgate_billing_ready") == 1
    assert _v(s, "pointgate_billing_postgres_up") == 1 == _v(s, "pointgate_billing_redis_up")
    assert _v(s, "pointgate_build_info", program="billing", version="dev") == 1
    # A HEAD is answered too (probes use it); other methods are 405, other paths 404.
    assert _get(stack, "/metrics", "HEAD").status == 200
    assert _get(stack, "/metrics", "POST").status == 405
    r = _get(stack, "/nope")
    assert r.status == 404 and r.json()["error"] == "not_found"


def test_healthz_ok_while_workers_turn(stack):
    _billing(stack)
    # Longer than the stall bound: the workers keep stamping while idle.
    time.sleep(6)
    r = _get(stack, "/healthz")
    assert r.status == 200 and r.json() == {"status": "ok"}, r


def test_topups_and_adjustments_are_counted_exactly(stack):
    _billing(stack)
    acct, _ = stack.new_account(0)
    before = _scrape(stack)
    ref = f"t-{uuid.uuid4().hex}"
    assert stack.admin("POST", f"/v1/accounts/{acct}/topups",
                       {"amount": 70, "reference": ref}).status == 201
    # A replay of the same top-up is not a new one.
    assert stack.admin("POST", f"/v1/accounts/{acct}/topups",
                       {"amount": 70, "reference": ref}).status == 200
    assert stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                       {"amount": 5, "reason": "goodwill"}).status == 201
    assert stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                       {"amount": -12, "reason": "correction"}).status == 201
    after = _scrape(stack)

    def d(name, **labels):
        return _v(after, name, **labels) - _v(before, name, **labels)
    assert d("pointgate_billing_topups_total") == 1
    assert d("pointgate_billing_topup_points_total") == 70
    assert d("pointgate_billing_adjustments_total", direction="credit") == 1
    assert d("pointgate_billing_adjustments_total", direction="debit") == 1
    assert d("pointgate_billing_adjustment_points_total", direction="credit") == 5
    assert d("pointgate_billing_adjustment_points_total", direction="debit") == 12
    ep = "/v1/accounts/{id}/topups"
    assert d("pointgate_billing_api_requests_total", endpoint=ep, code="201") == 1
    assert d("pointgate_billing_api_requests_total", endpoint=ep, code="200") == 1


def test_api_requests_by_template_and_code(stack):
    _billing(stack)
    before = _scrape(stack)
    assert stack.admin("GET", "/v1/accounts/987654321").status == 404
    assert stack.admin("GET", "/v1/accounts/987654321", token=None).status == 401
    assert stack.admin("GET", "/v1/no/such/thing/at/all").status == 404
    assert stack.admin("GET", "/healthz", token=None).status == 200
    after = _scrape(stack)

    def d(**labels):
        return (_v(after, "pointgate_billing_api_requests_total", **labels) -
                _v(before, "pointgate_billing_api_requests_total", **labels))
    assert d(endpoint="/v1/accounts/{id}", code="404") == 1
    assert d(endpoint="/v1/accounts/{id}", code="401") == 1
    assert d(endpoint="other", code="404") == 1
    assert d(endpoint="/healthz", code="200") == 1
    # Never a raw path or an id as a label value.
    assert "987654321" not in _scrape_text(stack)


def test_settled_batch_of_gateway_calls(stack):
    _billing(stack)
    stack.start_devsim()
    stack.start_gateway()
    acct, key = stack.new_account_in_redis(100)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    before = _scrape(stack)
    n = 6
    for i in range(n):
        r = http("GET", f"{stack.gateway.url}/v1/devices/ops-{i}",
                 headers={"Authorization": f"Bearer {key}"})
        assert r.status == 200, r
    stack.wait_for(lambda: stack.scalar(
        f"select count(*) from charges where account_id = {acct}") == str(n), timeout=30,
        what="calls settled")
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    after = _scrape(stack)

    def d(name, **labels):
        return _v(after, name, **labels) - _v(before, name, **labels)
    assert d("pointgate_billing_settled_records_total", outcome="commit") == n
    assert d("pointgate_billing_settle_batch_records_sum") == n
    assert d("pointgate_billing_settle_batch_records_count") >= 1
    assert d("pointgate_billing_settle_batch_duration_seconds_count") == \
        d("pointgate_billing_settle_batch_records_count")
    assert _v(after, "pointgate_billing_outbox_backlog_records") == 0
    assert _v(after, "pointgate_billing_outbox_oldest_age_seconds") == 0


def test_dead_letter_is_counted(stack):
    _billing(stack)
    red = Redis(stack.redis_port)
    try:
        red.call("DEL", "pg:outbox:dead")
        before = _scrape(stack)
        outbox_add(red, int(time.time() * 1000),
                   (f"ghost-{uuid.uuid4().hex[:8]}", 999999999, "device.read", 4, 4, "commit", 200))
        stack.wait_for(lambda: red.call("XLEN", "pg:outbox:dead") == 1, timeout=20,
                       what="dead letter written")
        stack.wait_for(lambda: _v(_scrape(stack), "pointgate_billing_dead_letters") == 1,
                       timeout=5, what="dead letters gauge")
        after = _scrape(stack)
        assert (_v(after, "pointgate_billing_dead_letters_total") -
                _v(before, "pointgate_billing_dead_letters_total")) == 1
    finally:
        red.call("DEL", "pg:outbox:dead")
        red.close()


def test_sweeper_releases_are_counted(stack):
    _billing(stack)
    acct, _ = stack.new_account_in_redis(10)
    before = _scrape(stack)
    red = Redis(stack.redis_port)
    try:
        assert red.reserve(acct, f"sw-{uuid.uuid4().hex[:8]}", 4, 100, "device.command")[0] == 1
        stack.wait_for(lambda: red.call("HLEN", holds_key(acct)) == 0, timeout=10,
                       what="expired hold released")
    finally:
        red.close()
    after = _scrape(stack)
    assert (_v(after, "pointgate_billing_sweeper_releases_total") -
            _v(before, "pointgate_billing_sweeper_releases_total")) == 1
    assert (_v(after, "pointgate_billing_sweeper_released_points_total") -
            _v(before, "pointgate_billing_sweeper_released_points_total")) == 4
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    s = _scrape(stack)
    assert (_v(s, "pointgate_billing_settled_records_total", outcome="expire") -
            _v(before, "pointgate_billing_settled_records_total", outcome="expire")) == 1


def test_repair_pass_counts_its_fixes(stack):
    _billing(stack)
    acct, key = stack.new_account_in_redis(10)
    stack.wait_for(lambda: _v(_scrape(stack), "pointgate_billing_repair_passes_total",
                              result="ok") >= 1, timeout=15, what="a repair pass")
    # A pass that finds Redis in step fixes nothing...
    s0 = _scrape(stack)
    stack.wait_for(lambda: _v(_scrape(stack), "pointgate_billing_repair_passes_total",
                              result="ok") > _v(s0, "pointgate_billing_repair_passes_total",
                                                result="ok"), timeout=15, what="next pass")
    s1 = _scrape(stack)
    assert _v(s1, "pointgate_billing_repair_fixes_total") == \
        _v(s0, "pointgate_billing_repair_fixes_total")
    # ...one that finds the account's hash and a key gone makes two fixes.
    stack.redis("DEL", f"pg:{{{acct}}}:acct")
    keys = stack.redis_raw("KEYS", "pg:key:*").splitlines()
    live = [k for k in keys if stack.redis_raw("GET", k).split("|")[0] == str(acct)]
    assert len(live) == 1, live
    stack.redis("DEL", live[0])
    ok = _v(s1, "pointgate_billing_repair_passes_total", result="ok")
    stack.wait_for(lambda: stack.redis_raw("GET", live[0]).split("|")[0] == str(acct), timeout=15,
                   what="key repaired")
    stack.wait_for(lambda: _v(_scrape(stack), "pointgate_billing_repair_passes_total",
                              result="ok") > ok, timeout=15, what="pass done")
    s2 = _scrape(stack)
    assert _v(s2, "pointgate_billing_repair_fixes_total") - \
        _v(s1, "pointgate_billing_repair_fixes_total") == 2
    assert _v(s2, "pointgate_billing_repair_pass_duration_seconds_count") >= 2


def test_readyz_follows_redis(stack):
    _billing(stack)
    r = _get(stack, "/readyz")
    assert r.status == 200 and r.json() == {"status": "ready"}, r
    stack.service("redis-stop")
    try:
        def down():
            r = _get(stack, "/readyz")
            return r.status == 503 and r.json()["reasons"] == ["redis"] and r
        r = stack.wait_for(down, timeout=10, what="readyz 503 redis")
        assert r.json()["status"] == "not_ready"
        s = _scrape(stack)
        assert _v(s, "pointgate_billing_redis_up") == 0 and _v(s, "pointgate_billing_ready") == 0
        # Alive all the same: the workers keep turning while Redis is away.
        assert _get(stack, "/healthz").status == 200
    finally:
        stack.service("redis-start")
    stack.wait_for(lambda: _get(stack, "/readyz").status == 200, timeout=20,
                   what="ready again")
    assert _v(_scrape(stack), "pointgate_billing_redis_up") == 1


def test_sigterm_turns_readyz_to_draining_first(stack):
    """With BILLING_STOP_DELAY_MS the stop waits before the workers stop:
    during it the ops port answers 503 "draining" and the admin API still
    serves; then the process exits 0."""
    p = stack.start_billing({"BILLING_STOP_DELAY_MS": "3000"})
    stack.wait_for(lambda: http("GET", p.ops_url + "/readyz").status == 200, timeout=20,
                   what="ready")
    p.signal(signal.SIGTERM)
    t0 = time.time()
    r = stack.wait_for(lambda: (lambda r: r.status == 503 and r)(http("GET", p.ops_url + "/readyz")),
                       timeout=2, what="draining")
    assert r.json() == {"status": "not_ready", "reasons": ["draining"]}, r
    assert time.time() - t0 < 2
    assert http("GET", p.url + "/healthz").status == 200  # still serving
    assert p.alive()
    assert p.stop(timeout=20) == 0
    assert time.time() - t0 >= 2.5
