"""Finance: usage reports, monthly statements, named operators and the CLI.

Charges are fed through the real outbox stream and settlement worker, with
timestamps chosen to sit on UTC month and day boundaries.
"""
import calendar
import csv
import io
import time
from datetime import datetime, timezone

from harness import FINANCE_TOKEN, http


def ms(iso):
    """Milliseconds since the epoch of an ISO UTC instant."""
    dt = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
    return calendar.timegm(dt.utctimetuple()) * 1000 + dt.microsecond // 1000


def feed(stack, acct, rid, route, amount, outcome, when):
    rec = "|".join(str(x) for x in (rid, acct, route, amount, max(amount, 1), outcome,
                                     200 if outcome == "commit" else 503))
    stack.redis("XADD", "pg:outbox", "*", "ts", ms(when), "c", rec)


def settled(stack, n):
    stack.wait_for(lambda: stack.scalar("select count(*) from charges") == str(n) and stack.drained(),
                   what=f"{n} charges settled")


def setup_traffic(stack):
    if stack.billing is None:
        stack.start_billing()
    if getattr(stack, "_report_accounts", None):
        return stack._report_accounts
    a, _ = stack.new_account(1000, name="alpha")
    b, _ = stack.new_account(500, name="beta")
    feed(stack, a, "r-a1", "device.read", 1, "commit", "2026-10-31T23:59:59.999")
    feed(stack, a, "r-a2", "device.read", 1, "commit", "2026-11-01T00:00:00.000")
    feed(stack, a, "r-a3", "device.command", 5, "commit", "2026-11-01T12:00:00.000")
    feed(stack, a, "r-a4", "device.command", 0, "release", "2026-11-02T08:00:00.000")
    feed(stack, b, "r-b1", "device.read", 1, "commit", "2026-11-30T23:59:59.999")
    feed(stack, b, "r-b2", "device,\"odd\" route", 3, "commit", "2026-12-01T00:00:00.000")
    settled(stack, 6)
    stack._report_accounts = (a, b)
    return a, b


def finance(stack, path, headers=None):
    h = {"Authorization": f"Bearer {FINANCE_TOKEN}"}
    h.update(headers or {})
    return http("GET", stack.admin_url + path, headers=h)


def test_usage_report_groupings(stack):
    a, b = setup_traffic(stack)
    r = finance(stack, "/v1/reports/usage?from=2026-11-01&to=2026-12-01&group_by=account,route,day")
    assert r.status == 200, r
    body = r.json()
    rows = {(x["account_id"], x["route"], x["day"]): x for x in body["rows"]}
    assert rows[(a, "device.read", "2026-11-01")]["points"] == 1
    assert rows[(a, "device.command", "2026-11-01")]["points"] == 5
    assert rows[(a, "device.command", "2026-11-02")] == {
        "account_id": a, "route": "device.command", "day": "2026-11-02", "calls": 1, "points": 0,
        "failed_calls": 1}
    assert rows[(b, "device.read", "2026-11-30")]["calls"] == 1
    # Oct 31 23:59:59.999 and Dec 1 00:00 fall outside November
    assert body["totals"] == {"calls": 4, "points": 7, "failed_calls": 1}
    # group_by account only: fields present are exactly the grouped ones
    r = finance(stack, "/v1/reports/usage?from=2026-10-01&to=2027-01-01&group_by=account")
    rows = r.json()["rows"]
    assert all(set(x) == {"account_id", "calls", "points", "failed_calls"} for x in rows)
    assert {x["account_id"]: x["points"] for x in rows} == {a: 7, b: 4}
    # no grouping: one row, the totals
    r = finance(stack, "/v1/reports/usage?from=2026-10-01&to=2027-01-01")
    assert r.json()["rows"] == [{"calls": 6, "points": 11, "failed_calls": 1}]
    assert r.json()["totals"] == {"calls": 6, "points": 11, "failed_calls": 1}


def test_usage_report_csv(stack):
    setup_traffic(stack)
    r = finance(stack, "/v1/reports/usage?from=2026-10-01&to=2027-01-01&group_by=route&format=csv")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/csv")
    text = r.body.decode()
    assert text.startswith("route,calls,points,failed_calls\r\n")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["route", "calls", "points", "failed_calls"]
    by_route = {x[0]: x[1:] for x in rows[1:]}
    assert by_route['device,"odd" route'] == ["1", "3", "0"]  # quoted per RFC 4180
    assert '"device,""odd"" route"' in text
    assert by_route["device.read"] == ["3", "3", "0"]
    # Accept: text/csv works too
    r = finance(stack, "/v1/reports/usage?from=2026-10-01&to=2027-01-01&group_by=day",
                {"Accept": "text/csv"})
    assert r.body.decode().startswith("day,calls,points,failed_calls\r\n")


def test_usage_report_bad_input(stack):
    setup_traffic(stack)
    bad = ["from=2026-11-01", "from=2026-02-30&to=2026-03-01", "from=2026-13-01&to=2026-14-01",
           "from=2026-11-01&to=2026-11-01", "from=2026-12-01&to=2026-11-01",
           "from=26-11-01&to=2026-12-01", "from=2026-11-01&to=2026-12-01&group_by=account,color",
           "from=2026-11-01&to=2026-12-01&group_by=account,", "from=2026-11-01&to=2026-12-01&format=xml",
           "from=2026-11-01&to=2026-12-01&account=abc"]
    for q in bad:
        r = finance(stack, "/v1/reports/usage?" + q)
        assert r.status == 400, (q, r)
        assert r.json()["error"] == "bad_request"
    r = http("GET", stack.admin_url + "/v1/reports/usage?from=2026-11-01&to=2026-12-01")
    assert r.status == 401
    r = stack.admin("POST", "/v1/reports/usage?from=2026-11-01&to=2026-12-01")
    assert r.status == 405


def statement(stack, acct, month):
    r = finance(stack, f"/v1/reports/statement?account={acct}&month={month}")
    assert r.status == 200, r
    return r.json()


def test_statement_month_boundaries(stack):
    a, b = setup_traffic(stack)
    # put the seed top-up of account a at the very end of September (UTC)
    stack.psql(f"update ledger_entries set created_at = '2026-09-30T23:59:59.999Z' "
               f"where account_id = {a}")
    r = stack.admin("POST", f"/v1/accounts/{a}/topups", {"amount": 50, "reference": "nov-topup"})
    assert r.status == 201
    stack.psql(f"update ledger_entries set created_at = '2026-11-01T00:00:00Z' "
               f"where reference = 'nov-topup'")
    sep, octo, nov, dec = (statement(stack, a, m) for m in ("2026-09", "2026-10", "2026-11", "2026-12"))
    assert sep["opening"] == 0 and sep["credits"]["total"] == 1000 and sep["closing"] == 1000
    assert octo["opening"] == 1000 and octo["charges"]["total"] == 1 and octo["closing"] == 999
    assert nov["opening"] == 999
    assert nov["credits"]["total"] == 50
    assert [e["reference"] for e in nov["credits"]["entries"]] == ["nov-topup"]
    assert nov["charges"]["total"] == 6
    assert {x["route"]: x["points"] for x in nov["charges"]["by_route"]} == {
        "device.read": 1, "device.command": 5}
    assert nov["closing"] == 999 + 50 - 6
    assert dec["opening"] == nov["closing"]
    for s in (sep, octo, nov, dec):
        assert s["opening"] + s["credits"]["total"] - s["charges"]["total"] == s["closing"]
    # the last closing is the account's balance in Postgres
    acct = stack.admin("GET", f"/v1/accounts/{a}").json()
    assert dec["closing"] == acct["balance"] == acct["credited"] - acct["spent"]


def test_statement_bad_input(stack):
    a, _ = setup_traffic(stack)
    for q in ["account=abc&month=2026-11", f"account={a}&month=2026-13", f"account={a}&month=2026-1",
              f"account={a}", "month=2026-11", f"account={a}&month=1999-12"]:
        r = finance(stack, "/v1/reports/statement?" + q)
        assert r.status == 400, (q, r)
    r = finance(stack, "/v1/reports/statement?account=999999&month=2026-11")
    assert r.status == 404


def test_named_operators(stack):
    a, _ = setup_traffic(stack)
    p = stack.run_billing("operators", "add", "fiona", "--role", "finance")
    ftok = [l.split()[1] for l in p.stdout.splitlines() if l.startswith("token ")][0]
    p = stack.run_billing("operators", "add", "adam", "--role", "admin")
    atok = [l.split()[1] for l in p.stdout.splitlines() if l.startswith("token ")][0]
    assert ftok.startswith("pgo_") and atok.startswith("pgo_")
    # only hashes are stored
    assert stack.scalar(f"select count(*) from operators where token_hash like '%{ftok[4:]}%'") == "0"
    assert stack.admin("GET", f"/v1/accounts/{a}", token=ftok).status == 200
    r = stack.admin("POST", f"/v1/accounts/{a}/topups", {"amount": 5, "reference": "op-1"}, token=ftok)
    assert r.status == 403
    r = stack.admin("POST", f"/v1/accounts/{a}/topups", {"amount": 5, "reference": "op-1"}, token=atok)
    assert r.status == 201 and r.json()["operator"] == "adam"
    assert stack.scalar("select operator from ledger_entries where reference = 'op-1'") == "adam"
    # same name twice is refused with exit code 4
    p = stack.run_billing("operators", "add", "adam", "--role", "admin", check=False)
    assert p.returncode == 4
    # revoke takes effect on the very next call
    stack.run_billing("operators", "revoke", "adam")
    assert stack.admin("GET", f"/v1/accounts/{a}", token=atok).status == 401
    p = stack.run_billing("operators", "revoke", "adam", check=False)
    assert p.returncode == 3
    p = stack.run_billing("operators", "add", "Bad Name", "--role", "admin", check=False)
    assert p.returncode == 2
    p = stack.run_billing("operators", "add", "carl", "--role", "root", check=False)
    assert p.returncode == 2
    listing = stack.run_billing("operators", "list").stdout
    assert "adam" in listing and "revoked" in listing and "fiona" in listing


def test_cli_topup_reaches_redis_and_exit_codes(stack):
    setup_traffic(stack)
    out = stack.run_billing("accounts", "create", "cli-co").stdout
    acct = int(out.split()[1])
    p = stack.run_billing("topup", str(acct), "70", "--reference", "cli-1")
    assert "credited now 70" in p.stdout
    assert stack.hot(acct)["credited"] == 70
    p = stack.run_billing("topup", str(acct), "70", "--reference", "cli-1")
    assert "nothing added" in p.stdout
    assert stack.scalar(f"select credited from accounts where id = {acct}") == "70"
    assert stack.run_billing("topup", str(acct), "71", "--reference", "cli-1", check=False).returncode == 4
    assert stack.run_billing("adjust", str(acct), "-100", "--reason", "x", check=False).returncode == 4
    assert stack.run_billing("adjust", str(acct), "-20", "--reason", "refund").returncode == 0
    assert stack.hot(acct)["credited"] == 50
    assert stack.run_billing("topup", "999999", "5", "--reference", "z", check=False).returncode == 3
    for bad in (["topup", str(acct), "0", "--reference", "z"], ["topup", str(acct), "1.5", "--reference", "z"],
                ["topup", str(acct), "5"], ["topup", str(acct), "1000000000001", "--reference", "z"],
                ["adjust", str(acct), "5"], ["report", "usage", "--from", "2026-11-01"],
                ["report", "statement", str(acct), "2026-13"], ["accounts", "frobnicate"],
                ["topup", str(acct), "5", "--reference", "z", "--bogus"], ["nonsense"]):
        p = stack.run_billing(*bad, check=False)
        assert p.returncode == 2, (bad, p.returncode, p.stderr)
        assert p.stderr.strip(), bad
    assert stack.scalar(f"select credited from accounts where id = {acct}") == "50"
    for cmd in (["--help"], ["topup", "--help"], ["report", "usage", "--help"], ["accounts", "list", "--help"],
                ["operators", "add", "--help"], ["keys", "create", "--help"]):
        p = stack.run_billing(*cmd, check=False)
        assert p.returncode == 0 and "usage" in p.stdout, cmd
    key_out = stack.run_billing("keys", "create", str(acct)).stdout
    assert "pgk_" in key_out
    table = stack.run_billing("report", "usage", "--from", "2026-11-01", "--to", "2026-12-01",
                              "--group-by", "route").stdout
    assert "TOTAL" in table and "device.read" in table
    csv_out = stack.run_billing("report", "usage", "--from", "2026-11-01", "--to", "2026-12-01",
                                "--group-by", "route", "--csv").stdout
    assert csv_out.splitlines()[0] == "route,calls,points,failed_calls"  # text mode folds CRLF
    st = stack.run_billing("report", "statement", str(acct), time.strftime("%Y-%m", time.gmtime())).stdout
    assert "closing balance" in st and "50" in st
