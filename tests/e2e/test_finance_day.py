"""A day of traffic through the whole stack, read back as finance and as a
developer would: the usage report (JSON and CSV), the monthly statement, the
account view, Redis and the caller's own balance must all tell the same story.
"""
import concurrent.futures
import csv
import io
import random
import time

from harness import FINANCE_TOKEN, http


def _call(gw, key, kind, i):
    h = {"Authorization": f"Bearer {key}"}
    if kind == "read":
        return http("GET", f"{gw}/v1/devices/thermo-{i}", headers=h)
    if kind == "read-fail":
        h["X-Sim-Status"] = "503"
        return http("GET", f"{gw}/v1/devices/thermo-{i}", headers=h)
    if kind == "command":
        return http("POST", f"{gw}/v1/devices/lock-{i}/commands", {"action": "unlock"}, h)
    if kind == "batch":
        h["X-Sim-Usage"] = str(1 + i % 7)
        return http("POST", f"{gw}/v1/batch", {"items": list(range(3))}, h)
    raise ValueError(kind)


def _finance(stack, path):
    return http("GET", stack.admin_url + path, headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})


def test_a_day_of_traffic_adds_up(stack):
    stack.start_devsim()
    stack.start_billing()
    gw = stack.start_gateway().url
    accounts = [stack.new_account(3000, name=f"tenant-{n}") for n in range(3)]
    rng = random.Random(7)
    plan = [(acct, key, rng.choice(["read", "read", "read-fail", "command", "batch"]), i)
            for i in range(240) for acct, key in [rng.choice(accounts)]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as ex:
        answers = list(ex.map(lambda p: (p, _call(gw, p[1], p[2], p[3])), plan))

    expected = {acct: {"points": 0, "calls": 0, "failed": 0} for acct, _ in accounts}
    for (acct, _key, kind, i), r in answers:
        exp = expected[acct]
        exp["calls"] += 1
        charged = int(r.headers["x-points-charged"])
        if kind == "read-fail":
            assert r.status == 503 and charged == 0, r
            exp["failed"] += 1
        else:
            assert r.status in (200, 202), r
            want = {"read": 1, "command": 5, "batch": 2 * (1 + i % 7)}[kind]
            assert charged == want, (kind, i, charged)
        exp["points"] += charged

    stack.wait_for(stack.drained, what="outbox drained")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    month = today[:7]

    # finance: the usage report by account, JSON
    r = _finance(stack, f"/v1/reports/usage?from={today}&to={tomorrow}&group_by=account")
    assert r.status == 200, r
    by_acct = {row["account_id"]: row for row in r.json()["rows"]}
    # the same report as CSV
    r = _finance(stack, f"/v1/reports/usage?from={today}&to={tomorrow}&group_by=account,route&format=csv")
    rows = list(csv.DictReader(io.StringIO(r.body.decode())))
    csv_points = {}
    for row in rows:
        csv_points[int(row["account_id"])] = csv_points.get(int(row["account_id"]), 0) + int(row["points"])

    for acct, key in accounts:
        exp = expected[acct]
        assert by_acct[acct]["points"] == exp["points"], (acct, by_acct[acct], exp)
        assert by_acct[acct]["calls"] == exp["calls"]
        assert by_acct[acct]["failed_calls"] == exp["failed"]
        assert csv_points[acct] == exp["points"]
        # the statement of this month agrees with the report and the account
        st = _finance(stack, f"/v1/reports/statement?account={acct}&month={month}").json()
        assert st["charges"]["total"] == exp["points"]
        assert st["opening"] + st["credits"]["total"] - st["charges"]["total"] == st["closing"]
        view = stack.admin("GET", f"/v1/accounts/{acct}").json()
        assert view["spent"] == exp["points"]
        assert st["closing"] == view["balance"] == 3000 - exp["points"]
        assert view["available"] == view["balance"] and view["held"] == 0
        # Redis and Postgres agree; Postgres spent is the sum of its charge rows
        hot = stack.hot(acct)
        assert hot["spent"] == view["spent"] and hot["credited"] == view["credited"] and hot["held"] == 0
        assert stack.scalar(f"select coalesce(sum(amount), 0) from charges where account_id = {acct}") == str(exp["points"])
        # the developer's view: balance endpoint == X-Points-Remaining of a call made now
        h = {"Authorization": f"Bearer {key}"}
        last = http("GET", f"{gw}/v1/devices/thermo-last", headers=h)
        assert last.status == 200
        bal = http("GET", f"{gw}/_billing/balance", headers=h).json()
        assert bal["account_id"] == acct
        assert bal["available"] == int(last.headers["x-points-remaining"]) == view["balance"] - 1
        assert bal["held"] == 0
