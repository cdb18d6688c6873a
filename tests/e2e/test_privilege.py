"""Least privilege (issue 10, item 8): Redis needs a password and runs with
maxmemory and noeviction; the gateway talks to Redis as the ACL user
pointgate-gateway, which may run only what the gateway and its scripts need
on pg:* keys, and to Postgres as the role pointgate_gateway, which may only
read usage_daily. REDIS_URL carries the credentials (AUTH on every connect
and reconnect, never logged); a refused AUTH is Redis unavailable (503),
logged once, retried with backoff.
"""
import os
import re
import subprocess
import time

import harness
from harness import auth, http
from luahelp import Redis, RedisError

GW_USER = "pointgate-gateway"
GW_ROLE = "pointgate_gateway"


def _setup(stack):
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
        stack.start_gateway()


def _as_gateway(stack, *args):
    """redis-cli as the gateway's ACL user: (exit code, output)."""
    p = stack.redis_cli(*args, user=GW_USER, password=harness.GATEWAY_REDIS_PASSWORD)
    return p.returncode, (p.stdout + p.stderr).strip()


def _gw_psql(stack, sql, url=None):
    p = subprocess.run(["psql", url or stack.gateway_database_url, "-At", "-v", "ON_ERROR_STOP=1",
                        "-c", sql], capture_output=True, text=True, timeout=60)
    return p.returncode, (p.stdout + p.stderr).strip()


def _refused(out):
    """A NOPERM reply, or its form for a command called by a script."""
    return "NOPERM" in out or "user executing the script can't" in out


def _auth_failures(stack, user):
    """Refused AUTHs of USER since the last ACL LOG RESET (Redis groups
    equal entries and counts them)."""
    red = Redis(stack.redis_port)
    try:
        log = red.call("ACL", "LOG", "100")
    finally:
        red.close()
    n = 0
    for e in log:
        d = dict(zip(e[0::2], e[1::2]))
        if d.get("reason") == "auth" and d.get("username") == user:
            n += int(d["count"])
    return n


def test_redis_needs_a_password_and_is_bounded(stack):
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    p = subprocess.run(["redis-cli", "-p", str(stack.redis_port), "GET", "pg:epoch"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert "NOAUTH" in p.stdout + p.stderr, p
    p = stack.redis_cli("PING", password="not-the-password")
    assert "WRONGPASS" in p.stdout + p.stderr, p
    assert stack.redis_raw("PING") == "PONG"
    # The admin URL (billing's) is the default user with the password.
    assert stack.redis_url.startswith(f"redis://:{harness.REDIS_PASSWORD}@127.0.0.1:")
    assert stack.redis_raw("CONFIG", "GET", "maxmemory").splitlines() == \
        ["maxmemory", str(1 << 30)]
    assert stack.redis_raw("CONFIG", "GET", "maxmemory-policy").splitlines() == \
        ["maxmemory-policy", "noeviction"]
    # Neither password is readable by other users of the machine.
    for path in (os.path.join(stack.dir, "env"), os.path.join(stack.dir, "redis", "redis.conf")):
        assert os.stat(path).st_mode & 0o077 == 0, path


def test_gateway_redis_user_runs_only_what_it_needs(stack):
    """redis-cli as pointgate-gateway: the admin and bulk commands are refused,
    also from inside a script (a script runs with its caller's ACL); keys
    outside pg:* are refused; what the gateway needs works."""
    stack.redis_raw("SET", "pg:priv:probe", "1")
    stack.redis_raw("SET", "other:probe", "1")
    refused = [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"),
               ("CONFIG", "SET", "maxmemory", "0"), ("KEYS", "*"), ("SCAN", "0"),
               ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"),
               ("ACL", "SETUSER", GW_USER, "+@all"), ("MODULE", "LIST"), ("SCRIPT", "FLUSH"),
               ("SCRIPT", "KILL"), ("FUNCTION", "FLUSH"), ("SWAPDB", "0", "1"),
               ("CLIENT", "LIST"), ("INFO",), ("SAVE",), ("BGREWRITEAOF",),
               ("REPLICAOF", "127.0.0.1", "1"), ("MIGRATE", "127.0.0.1", "1", "pg:priv:probe",
                                                     "0", "1000"),
               ("XREADGROUP", "GROUP", "settle", "x", "STREAMS", "pg:outbox", ">"),
               ("XDEL", "pg:outbox", "1-1"), ("XTRIM", "pg:outbox", "MAXLEN", "0"),
               ("PUBLISH", "x", "y"), ("RENAME", "pg:priv:probe", "pg:y"),
               ("UNLINK", "pg:priv:probe"), ("SORT", "pg:priv:probe"),
               ("EVAL", "return redis.call('FLUSHALL')", "0"),
               ("EVAL", "return redis.call('SCAN', '0')", "0"),
               ("EVAL", "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)", "1", "pg:outbox"),
               ("EVAL", "return redis.call('KEYS', '*')", "0")]
    for cmd in refused:
        rc, out = _as_gateway(stack, *cmd)
        # DEBUG and MODULE are also off for everyone (enable-*-command).
        assert _refused(out) or (cmd[0] in ("DEBUG", "MODULE") and "not allowed" in out), \
            (cmd, out)
    # Keys outside pg:*, directly or from a script.
    for cmd in (("GET", "other:probe"), ("SET", "other:x", "1"), ("DEL", "other:probe"),
                ("EVAL", "return redis.call('GET', 'other:probe')", "0"),
                ("EVAL", "return redis.call('GET', KEYS[1])", "1", "other:probe")):
        rc, out = _as_gateway(stack, *cmd)
        assert _refused(out), (cmd, out)
    assert stack.redis_raw("GET", "other:probe") == "1"
    assert stack.redis_raw("GET", "pg:priv:probe") == "1"
    assert stack.redis_raw("CONFIG", "GET", "maxmemory").splitlines()[1] == str(1 << 30)
    # What the gateway does: its plain commands, scripts with the commands
    # the real scripts call, on pg:* keys.
    for cmd, want in ((("PING",), "PONG"), (("GET", "pg:priv:probe"), "1"),
                      (("EXISTS", "pg:epoch"), "0"), (("HMGET", "pg:{1}:acct", "credited"), ""),
                      (("SCRIPT", "LOAD", "return 1"), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"),
                      (("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"), "1"),
                      (("SELECT", "0"), "OK")):
        rc, out = _as_gateway(stack, *cmd)
        assert rc == 0 and out == want, (cmd, out)
    script = ("redis.call('TIME'); redis.call('HSET', KEYS[1], 'a', 1); "
              "redis.call('HINCRBY', KEYS[1], 'a', 2); redis.call('HDEL', KEYS[1], 'b'); "
              "redis.call('HGET', KEYS[1], 'a'); redis.call('HMGET', KEYS[1], 'a'); "
              "redis.call('XADD', KEYS[2], '*', 'ts', '1'); "
              "redis.call('INCRBY', KEYS[3], 1); redis.call('GET', KEYS[3]); "
              "redis.call('SET', KEYS[4], '5', 'EX', 60); redis.call('EXPIRE', KEYS[4], 60); "
              "redis.call('SET', KEYS[4], '6', 'KEEPTTL'); redis.call('DEL', KEYS[4]); "
              "return redis.call('EXISTS', KEYS[1])")
    rc, out = _as_gateway(stack, "EVAL", script, "4", "pg:{priv}:acct", "pg:priv:stream",
                          "pg:priv:counter", "pg:{priv}:swept:r1")
    assert rc == 0 and out == "1", out
    # The gateway's connections really are this user.
    _setup(stack)
    acct, key = stack.new_account_in_redis(10)
    assert http("GET", stack.gateway.url + "/v1/devices/d1", headers=auth(key)).status == 200
    users = re.findall(r" user=(\S+)", stack.redis_raw("CLIENT", "LIST"))
    assert GW_USER in users, users


def _gateway_commands():
    """Every Redis command the gateway can send: those of the scripts it runs
    (a script runs with its caller's ACL) and the ones its C code names."""
    cmds = set()
    for name in ("common/prelude.lua", "billing/reserve.lua", "billing/settle.lua",
                 "billing/lease.lua"):
        with open(os.path.join(harness.ROOT, name)) as f:
            cmds |= {c.upper() for c in
                     re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]", f.read())}
    for name in os.listdir(os.path.join(harness.ROOT, "gateway")):
        if not name.endswith(".c"):
            continue
        with open(os.path.join(harness.ROOT, "gateway", name)) as f:
            src = f.read()
        if "redisAsyncCommand" not in src:
            continue
        # Command names where the C code builds a command: argv[0] = "GET",
        # hot_arg(&a, "EVALSHA", ...), redisAsyncCommand(..., "SELECT %s").
        cmds |= set(re.findall(r'argv\[[^\]]*\] = "([A-Z]+)"', src))
        cmds |= set(re.findall(r'hot_arg\(&\w+, "([A-Z]+)"', src))
        cmds |= set(re.findall(r'redisAsyncCommand\([^;]*?"([A-Z]+)[ "]', src, re.S))
        if "SCRIPT LOAD" in src:
            cmds.discard("SCRIPT")  # a container: its subcommand is checked
            cmds.add("SCRIPT|LOAD")
    return cmds


def test_gateway_acl_covers_every_command_it_sends(stack):
    """A guard for whoever changes a script: each command the gateway or its
    scripts call is allowed to pointgate-gateway on pg:* keys (ACL DRYRUN),
    so a new one fails here, not as NOPERM in production."""
    red = Redis(stack.redis_port)
    try:
        cmds = _gateway_commands()
        assert {"EVALSHA", "EVAL", "SCRIPT|LOAD", "GET", "HMGET", "HSET", "HINCRBY", "XADD",
                "TIME"} <= cmds, cmds
        checked = []
        for c in sorted(cmds):
            name, _, sub = c.partition("|")
            info = red.call("COMMAND", "INFO", name)
            if not info or info[0] is None:
                continue  # a literal that is not a Redis command
            arity = info[0][1]
            words = [name] + ([sub] if sub else [])
            n = abs(arity) - len(words)
            if sub:  # a container's arity is that of the subcommand
                n = 1
            args = words + ["pg:{1}:x"] * max(n, 0)
            out = red.call("ACL", "DRYRUN", GW_USER, *args)
            assert out == "OK", (c, out)
            checked.append(c)
        assert len(checked) >= 10, checked
    finally:
        red.close()


def test_gateway_serves_as_its_own_users(stack):
    """The default stack: the gateway charges calls and answers
    /_billing/usage through its Postgres role, and authenticates again after
    a Redis restart."""
    _setup(stack)
    assert stack.gateway_redis_url.startswith(f"redis://{GW_USER}:")
    assert stack.gateway_database_url.startswith(f"postgresql://{GW_ROLE}:")
    acct, key = stack.new_account_in_redis(10)
    gw = stack.gateway.url
    for _ in range(3):
        r = http("GET", gw + "/v1/devices/d1", headers=auth(key))
        assert r.status == 200, r
    day = time.strftime("%Y-%m-%d", time.gmtime())
    to = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 2 * 86400))

    def usage():
        r = http("GET", gw + f"/_billing/usage?from={day}&to={to}", headers=auth(key))
        assert r.status == 200, r
        return r.json()["totals"]["calls"] == 3 and r.json()["totals"]["points"] == 3

    stack.wait_for(usage, timeout=30, what="usage through the gateway's role")
    backends = stack.psql("select usename from pg_stat_activity where usename is not null")
    assert [GW_ROLE] in backends, backends
    # AUTH again on reconnect.
    stack.service("redis-stop")
    stack.service("redis-start")

    def served():
        return http("GET", gw + "/v1/devices/d1", headers=auth(key)).status == 200

    stack.wait_for(served, timeout=30, what="served after a Redis restart")
    assert "refused" not in stack.gateway.output()


def test_gateway_postgres_role_reads_usage_only(stack):
    rc, out = _gw_psql(stack, "select count(*) from usage_daily")
    assert rc == 0 and out.isdigit(), out
    for sql in ("select * from api_keys", "select * from accounts", "select * from charges",
                "select * from ledger_entries", "select * from operators",
                "select * from schema_migrations",
                "insert into charges values ('x', 1, 'r', 1, 1, 'commit', 200, now())",
                "update accounts set spent = 0", "update usage_daily set points = 0",
                "insert into usage_daily values (1, '2024-01-01', 'r', 1, 1, 0)",
                "delete from usage_daily", "truncate usage_daily",
                "insert into ledger_entries (account_id, kind, amount, reason, credit_seq, "
                "credited_after, operator) values (1, 'adjustment', 5, 'x', 99, 5, 'x')",
                "create table t (x int)", "alter role pointgate_gateway superuser"):
        rc, out = _gw_psql(stack, sql)
        assert rc != 0 and ("permission denied" in out or "must be" in out), (sql, out)
    # Its password is checked (the rest of this test cluster trusts local
    # connections).
    bad = re.sub(r":[^:@/]+@", ":wrong@", stack.gateway_database_url)
    rc, out = _gw_psql(stack, "select 1", url=bad)
    assert rc != 0 and "password authentication failed" in out, out


def test_wrong_redis_password_is_503_logged_once_and_retried(stack):
    """A gateway whose Redis password is refused answers 503
    billing_unavailable (never 401/402), logs the refusal once (not the
    password), reconnects with backoff, and serves as soon as the password is
    accepted."""
    _setup(stack)
    acct, key = stack.new_account_in_redis(10)
    # Not the gateway's password, and one that needs percent-encoding: the
    # fix below makes it the right one, which proves the decoding too.
    wrong = "wrong@gw pass:4711"
    encoded = "wrong%40gw%20pass:4711"
    url = stack.gateway_redis_url.replace(harness.GATEWAY_REDIS_PASSWORD, encoded)
    assert encoded in url
    stack.redis_raw("ACL", "LOG", "RESET")
    port = harness.free_port()
    gw = stack.spawn("gateway-wrongpw", [stack.bin("gateway")], {
        "GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
        "ROUTES_FILE": stack.write_routes(harness.DEFAULT_ROUTES), "GATEWAY_THREADS": "1",
        "REDIS_URL": url}, port)
    try:
        t0 = time.time()
        for _ in range(5):
            r = http("GET", gw.url + "/v1/devices/d1", headers=auth(key))
            assert r.status == 503 and r.json()["error"] == "billing_unavailable", r
        stack.wait_for(lambda: _auth_failures(stack, GW_USER) >= 3, timeout=20,
                       what="reconnects")
        time.sleep(3)
        attempts = _auth_failures(stack, GW_USER)
        elapsed = time.time() - t0
        # Backoff (50 ms doubling to 1 s): about one attempt a second, not 20.
        assert attempts <= elapsed / 0.5 + 6, (attempts, elapsed)
        out = gw.output()
        assert out.count("AUTH refused") == 1, out[-3000:]
        assert "WRONGPASS" in out
        assert wrong not in out and encoded not in out and "4711" not in out, out[-3000:]
        assert "disconnected" not in out, out[-3000:]
        # The operator fixes the password: served again within seconds.
        stack.redis_raw("ACL", "SETUSER", GW_USER, ">" + wrong)

        def served():
            return http("GET", gw.url + "/v1/devices/d1", headers=auth(key)).status == 200

        stack.wait_for(served, timeout=15, what="served once the password is accepted")
        assert "accepted again" in gw.output()
        assert stack.hot(acct)["held"] >= 0
    finally:
        stack.redis_raw("ACL", "SETUSER", GW_USER, "<" + wrong)
        assert gw.stop() == 0
    assert "4711" not in gw.output()


def test_billing_wrong_redis_password_is_logged_once_not_shown(stack):
    """billing's sync client: AUTH on every connect; a refused one fails the
    command (exit 1, as for an unreachable Redis) and never prints the
    password."""
    wrong = "wrong-billing-password-4711"
    url = stack.redis_url.replace(harness.REDIS_PASSWORD, wrong)
    p = stack.run_billing("repair", env={"REDIS_URL": url}, check=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "AUTH refused" in p.stderr and "WRONGPASS" in p.stderr, p.stderr
    assert wrong not in p.stdout + p.stderr
    # The right one, through an ACL user of its own, AUTH user password.
    stack.redis_raw("ACL", "SETUSER", "priv-billing", "on", ">pw%40x", "~*", "&*", "+@all")
    try:
        url = stack.redis_url.replace(f":{harness.REDIS_PASSWORD}@", "priv-billing:pw%2540x@")
        p = stack.run_billing("repair", env={"REDIS_URL": url}, check=False)
        assert p.returncode == 0, p.stderr
    finally:
        stack.redis_raw("ACL", "DELUSER", "priv-billing")


def test_bad_redis_url_stops_both_at_start(stack):
    """A malformed REDIS_URL: a clear error naming REDIS_URL, exit 2, and the
    password redacted from the message."""
    secret = "s3cretvalue"
    cases = [f"redis://:{secret}%zz@127.0.0.1:6379/0", f"redis://u:{secret}/x@127.0.0.1:6379/0",
             f"redis://{secret}@127.0.0.1:6379/0", f"redis://:{secret}@127.0.0.1:99999/0",
             f"redis://:{secret}@127.0.0.1:6379/77", f"rediss://:{secret}@127.0.0.1:6379/0",
             f"redis://u:@127.0.0.1:6379/0"]
    base = {"GATEWAY_LISTEN": f"127.0.0.1:{harness.free_port()}",
            "UPSTREAM_URL": "http://127.0.0.1:1", "ROUTES_FILE": stack.write_routes(
                harness.DEFAULT_ROUTES)}
    for url in cases:
        env = dict(stack.env, **base)
        env["REDIS_URL"] = url
        p = subprocess.run([stack.bin("gateway")], env=env, capture_output=True, text=True,
                           timeout=20)
        assert p.returncode == 2, (url, p.returncode, p.stderr)
        assert "REDIS_URL" in p.stderr and secret not in p.stderr, (url, p.stderr)
        assert "Sanitizer" not in p.stderr, p.stderr
        for cmd in (("serve",), ("repair",), ("accounts", "list")):
            b = stack.run_billing(*cmd, env={"REDIS_URL": url, "BILLING_LISTEN":
                                             f"127.0.0.1:{harness.free_port()}"}, check=False)
            assert b.returncode == 2, (cmd, url, b.returncode, b.stderr)
            assert "REDIS_URL" in b.stderr and secret not in b.stderr + b.stdout, (cmd, b.stderr)


def test_gateway_role_grant_works_with_or_without_the_role(stack):
    """schema/006_gateway_role.sql: with the role present it grants; absent,
    a migrating superuser creates it NOLOGIN and grants; a migrating user who
    may not create roles still migrates (with a warning). Last in this
    module: it drops and restores the role."""
    def fresh(name, owner="postgres"):
        stack.psql(f"drop database if exists {name}")
        stack.psql(f"create database {name} owner {owner}")
        return re.sub(r"//[^@]+@", f"//{owner}@", re.sub(r"/[^/]+$", f"/{name}",
                                                          stack.env["DATABASE_URL"]))

    def can_read(url):
        return stack.run_billing("migrate", env={"DATABASE_URL": url}, check=False), \
            subprocess.run(["psql", url, "-At", "-c", "select has_table_privilege("
                            f"'{GW_ROLE}', 'usage_daily', 'select')"],
                           capture_output=True, text=True, timeout=60).stdout.strip()

    p, ok = can_read(fresh("priv_with_role"))
    assert p.returncode == 0 and ok == "t", (p.stderr, ok)
    stack.psql("drop database priv_with_role")
    stack.gateway and stack.gateway.stop()
    stack.gateway = None
    stack.psql(f"drop owned by {GW_ROLE}")
    stack.psql(f"drop role {GW_ROLE}")
    try:
        p, ok = can_read(fresh("priv_no_role"))
        assert p.returncode == 0 and ok == "t", (p.stderr, ok)
        assert stack.scalar(f"select rolcanlogin from pg_roles where rolname = '{GW_ROLE}'") == "f"
        stack.psql("drop database priv_no_role")
        stack.psql(f"drop role {GW_ROLE}")
        stack.psql("drop role if exists priv_plain")
        stack.psql("create role priv_plain login")
        url = fresh("priv_plain_db", owner="priv_plain")
        p = stack.run_billing("migrate", env={"DATABASE_URL": url}, check=False)
        assert p.returncode == 0, p.stderr
        assert f"role {GW_ROLE} does not exist" in p.stderr, p.stderr
        assert stack.scalar(f"select count(*) from pg_roles where rolname = '{GW_ROLE}'") == "0"
        stack.psql("drop database priv_plain_db")
        stack.psql("drop role priv_plain")
    finally:
        stack.psql(f"do $$ begin if not exists (select 1 from pg_roles where rolname = "
                   f"'{GW_ROLE}') then create role {GW_ROLE}; end if; end $$")
        stack.psql(f"alter role {GW_ROLE} login password '{harness.GATEWAY_PG_PASSWORD}'")
        stack.psql(f"grant select on usage_daily to {GW_ROLE}")
    rc, out = _gw_psql(stack, "select count(*) from usage_daily")
    assert rc == 0, out
