"""deploy/prometheus and deploy/grafana against the real tools (issue 11,
item 6): promtool on the scrape config, the rules and their unit tests,
promtool check metrics on both programs' live /metrics, and a real
Prometheus (Debian's /usr/bin/prometheus) scraping a running stack under
traffic, through whose HTTP API every dashboard query and every rule
expression is evaluated.

How "each returns data" is judged, so that a typo in a metric name, a label
name or a label value fails the test:
- every vector selector inside an expression (a metric name with its
  matchers, e.g. pointgate_gateway_requests_total{outcome="refused"}) is
  cut out of it (a small PromQL tokenizer below: functions, aggregations
  with their by/without lists, keywords, numbers, durations, ranges and
  offsets are skipped) and queried alone as an instant vector: it must
  return at least one series. The traffic is chosen so that every label
  value the dashboard and the rules name exists (a 5xx, a 402, ...);
- every dashboard query, with Grafana's variables replaced by concrete
  values ($__rate_interval and $__interval by a window covering the traffic,
  $__range likewise), must itself return a non-empty result: panels are
  not conditions;
- an alert expression is a condition (empty when nothing is wrong, which is
  the case here), so it is run whole only to show that Prometheus accepts
  and evaluates it (status success); its selectors carry the non-empty
  check. Prometheus loads alerts.yml itself too, and every rule must then
  report health "ok" from /api/v1/rules.
"""
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.parse

import yaml

import harness
from harness import ROOT, http

PROM = os.path.join(ROOT, "deploy", "prometheus")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "dashboards", "pointgate.json")
PROMETHEUS_BIN = "/usr/bin/prometheus"
WINDOW = "2m"  # what Grafana's interval variables become: covers all the traffic

# ---- a PromQL tokenizer, just enough to find vector selectors -------------
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<num>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:e[+-]?\d+)?)(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<braces>\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})
  | (?P<op>[-+*/%^(),<>=!~]+)
""", re.X)


def selectors(expr):
    """The vector selectors of EXPR, as strings: name{matchers}, or {matchers}."""
    toks = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        assert m, f"cannot tokenize {expr[pos:pos + 30]!r} in {expr!r}"
        pos = m.end()
        if m.lastgroup != "ws":
            toks.append((m.lastgroup, m.group()))
    out = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "ident" and text.lower() in GROUPING and nxt[1] and nxt[1].startswith("("):
            # by (a, b): skip to the closing parenthesis.
            while i < len(toks) and ")" not in toks[i][1]:
                i += 1
        elif kind == "ident" and nxt[1] and (nxt[1].startswith("(") or
                                             (nxt[0] == "ident" and nxt[1].lower() in GROUPING)):
            pass  # a function, or an aggregation (sum by (x) (...) too)
        elif kind == "ident" and text.lower() in KEYWORDS:
            pass
        elif kind == "ident":
            if nxt[0] == "braces":
                out.append(text + nxt[1])
                i += 1
            else:
                out.append(text)
        elif kind == "braces":
            out.append(text)
        i += 1
    return out


def test_selectors_tokenizer(stack):
    """The tokenizer itself, on the shapes the rules use."""
    e = ('sum by (job) (rate(a_total{status_class="5xx",x=~"y.*"}[5m] offset 10m)) '
         '/ sum by (job) (rate(a_total[1h])) > 3 * b and on (job) c == 0 or {__name__="d"}')
    assert selectors(e) == ['a_total{status_class="5xx",x=~"y.*"}', "a_total", "b", "c",
                            '{__name__="d"}'], selectors(e)
    assert selectors("histogram_quantile(0.99, sum by (le) (rate(h_bucket[1m])))") == ["h_bucket"]
    assert selectors("deriv(m[1h]) > 16 * 1024 * 1024 / 3600") == ["m"]


# ---- promtool ----------------------------------------------------------------

def _promtool(*args, input=None, cwd=PROM):
    p = subprocess.run(["promtool"] + list(args), capture_output=True, text=True, timeout=120,
                       input=input, cwd=cwd)
    return p.returncode, p.stdout + p.stderr


def _alert_rules():
    with open(os.path.join(PROM, "alerts.yml")) as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def test_promtool_check_config_and_rules(stack):
    rc, out = _promtool("check", "config", "prometheus.yml")
    assert rc == 0 and "SUCCESS" in out, out
    rc, out = _promtool("check", "rules", "alerts.yml")
    assert rc == 0, out
    assert f"SUCCESS: {len(_alert_rules())} rules found" in out, out


def test_promtool_test_rules_covers_every_alert(stack):
    rc, out = _promtool("test", "rules", "alerts_test.yml")
    assert rc == 0 and "SUCCESS" in out, out
    with open(os.path.join(PROM, "alerts_test.yml")) as f:
        tests = yaml.safe_load(f)
    assert tests["rule_files"] == ["alerts.yml"]
    fires, silent = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {r["alert"] for r in _alert_rules() if "alert" in r}
    # Every alert has a case where it fires and one where it must not.
    assert alerts - fires == set(), f"no firing test for {alerts - fires}"
    assert alerts - silent == set(), f"no silent test for {alerts - silent}"
    assert fires <= alerts, f"tests of unknown alerts: {fires - alerts}"


# ---- the stack under traffic --------------------------------------------------

def _setup(stack):
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    if stack.gateway is None or not stack.gateway.alive():
        stack.start_gateway(env={"GATEWAY_THREADS": "2"})
    gw = stack.gateway
    stack.wait_for(lambda: http("GET", gw.ops_url + "/readyz").status == 200, timeout=15,
                   what="gateway ready")
    stack.wait_for(lambda: http("GET", stack.billing.ops_url + "/readyz").status == 200,
                   timeout=15, what="billing ready")
    return gw


def _traffic(stack, gw):
    """One of each outcome the dashboard and the rules name."""
    acct, key = stack.new_account_in_redis(points=500)
    auth = harness.auth(key)
    for _ in range(5):  # charged
        assert http("GET", gw.url + "/v1/devices/d1", headers=auth).status == 200
    r = http("POST", gw.url + "/v1/batch", {"items": [1, 2, 3]}, headers=auth)
    assert r.status == 200 and r.headers.get("x-points-charged") == "6", r  # charged by usage
    # released: the upstream fails (a 5xx) and the held point goes back.
    r = http("GET", gw.url + "/v1/devices/d1", headers=dict(auth, **{"X-Sim-Status": "503"}))
    assert r.status == 503, r
    assert http("GET", gw.url + "/v1/devices/d1").status == 401  # unauthorized
    assert http("GET", gw.url + "/nowhere", headers=auth).status == 404  # no route
    assert http("GET", gw.url + "/_billing/balance", headers=auth).status == 200  # info
    _, poor = stack.new_account_in_redis(points=1)
    assert http("POST", gw.url + "/v1/devices/d1/commands", headers=harness.auth(poor),
                body=b"{}").status == 402  # refused
    # Billing: top-ups (new_account), an adjustment each way.
    for amount in (5, -5):
        r = stack.admin("POST", f"/v1/accounts/{acct}/adjustments",
                        {"amount": amount, "reason": "test_prometheus"})
        assert r.status == 201, r


def test_promtool_check_metrics_live(stack):
    gw = _setup(stack)
    _traffic(stack, gw)
    for name, url in (("gateway", gw.ops_url), ("billing", stack.billing.ops_url)):
        r = http("GET", url + "/metrics")
        assert r.status == 200, r
        text = r.body.decode()
        assert f'pointgate_build_info{{program="{name}"' in text
        rc, out = _promtool("check", "metrics", input=text)
        assert rc == 0, f"{name}: {out}"


# ---- a real Prometheus ---------------------------------------------------------

class Prometheus:
    def __init__(self, stack, targets):
        self.dir = tempfile.mkdtemp(prefix="prom-", dir=stack.dir)
        self.port = harness.free_port()
        conf = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "rule_files": [os.path.join(PROM, "alerts.yml")],
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                                "static_configs": [{"targets": [t]}]}
                               for job, t in targets.items()],
        }
        path = os.path.join(self.dir, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(conf, f)
        self.log = open(os.path.join(self.dir, "prometheus.log"), "ab")
        self.p = subprocess.Popen(
            [PROMETHEUS_BIN, f"--config.file={path}",
             f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            harness.wait_port(self.port, timeout=30, proc=self.p)
            deadline = time.time() + 30
            while http("GET", self.url + "/-/ready").status != 200:
                assert time.time() < deadline and self.p.poll() is None, self.output()
                time.sleep(0.1)
        except BaseException:
            self.stop()  # never left running by a failed start
            raise

    def api(self, path, **params):
        r = http("GET", self.url + "/api/v1/" + path + "?" + urllib.parse.urlencode(params))
        assert r.status in (200, 400, 422), r
        return r.json()

    def query(self, expr):
        d = self.api("query", query=expr)
        assert d["status"] == "success", f"{expr}: {d}"
        return d["data"]["result"]

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()

    def output(self):
        with open(os.path.join(self.dir, "prometheus.log"), "rb") as f:
            return f.read().decode(errors="replace")[-3000:]


def _dashboard_queries():
    with open(DASHBOARD) as f:
        dash = json.load(f)

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    out = []
    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            for var in ("$__rate_interval", "$__interval", "$__range"):
                expr = expr.replace(var, WINDOW)
            expr = expr.replace("${__rate_interval}", WINDOW).replace("${__range}", WINDOW)
            assert "$" not in expr, f"panel {p['title']!r}: an unhandled variable in {expr}"
            out.append((p["title"], expr))
    return out


def test_real_prometheus_evaluates_every_query(stack):
    gw = _setup(stack)
    prom = Prometheus(stack, {"pointgate-gateway": gw.ops_url[len("http://"):],
                              "pointgate-billing": stack.billing.ops_url[len("http://"):]})
    try:
        def both_up():
            r = prom.query('up{job=~"pointgate-.*"} == 1')
            return len(r) == 2
        stack.wait_for(both_up, timeout=30, what="both targets scraped and up")
        _traffic(stack, gw)
        # A few scrapes after the traffic, so that rates over WINDOW see it.
        time.sleep(4)
        _traffic(stack, gw)
        time.sleep(4)
        problems = []
        seen = set()
        queries = _dashboard_queries()
        assert len(queries) >= 30, len(queries)
        for title, expr in queries:
            if not prom.query(expr):
                problems.append(f"dashboard {title!r}: empty: {expr}")
            for sel in selectors(expr):
                seen.add(sel)
        rules = _alert_rules()
        for r in rules:
            prom.query(r["expr"])  # accepted and evaluated (status success)
            if "record" in r:
                if not prom.query(r["expr"]):
                    problems.append(f"recording rule {r['record']}: empty")
            for sel in selectors(r["expr"]):
                seen.add(sel)
            assert selectors(r["expr"]), f"{r.get('alert')}: no selector found"
        for sel in sorted(seen):
            if not prom.query(sel):
                problems.append(f"no series for {sel}")
        assert not problems, "\n".join(problems)
        # Prometheus loaded and evaluated every rule of alerts.yml.
        names = {r.get("alert") or r.get("record") for r in rules}

        def rules_ok():
            groups = prom.api("rules")["data"]["groups"]
            health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            return health if set(health) == names and set(health.values()) == {"ok"} else None
        stack.wait_for(rules_ok, timeout=10, what="every rule loaded, health ok")
        # Nothing is wrong with this stack, so nothing fires but the
        # 5xx ratio (our one failing call is a large share of few calls),
        # which holds for 5 min first: no alert is firing yet.
        firing = [a for a in prom.api("alerts")["data"]["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    except AssertionError:
        raise AssertionError(f"{__import__('traceback').format_exc()}\n--- prometheus log ---\n"
                             f"{prom.output()}") from None
    finally:
        prom.stop()
    assert prom.p.returncode == 0, prom.output()
