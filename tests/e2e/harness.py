"""Test harness: a real stack per test module.

Stack.start() brings up a throwaway Postgres and Redis (scripts/stack.sh) and
migrates the schema. Both run with least privilege as in production: Redis
needs a password, and every gateway the tests start (start_gateway() or
spawn() of the gateway binary) connects as the ACL user pointgate-gateway and
the Postgres role pointgate_gateway (stack.gateway_redis_url,
stack.gateway_database_url), unless a test's env says otherwise. Billing,
the unit tests and the tests' own access (psql(), redis(), luahelp.Redis)
use the admin side: stack.env's DATABASE_URL and REDIS_URL
(stack.redis_url, password stack.redis_password). Tests then start the processes they need
(billing serve, gateway, devsim) with start_billing(), start_gateway(),
start_devsim(); each runs the sanitized binaries from --bin, logs to the
stack directory, and is stopped (SIGTERM, then checked for sanitizer reports)
by Stack.stop(). Nothing here mocks Postgres, Redis or HTTP.
"""
import http.client as http_client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN_TOKEN = "test-admin-token-0123456789"
FINANCE_TOKEN = "test-finance-token-0123456789"
PEPPER = "test-pepper-0123456789abcdef"
# The stack's Redis password (its default user, full access: billing and the
# tests' own clients) and the gateway's credentials (scripts/stack.sh).
REDIS_PASSWORD = "test-redis-admin-0123456789"
GATEWAY_REDIS_PASSWORD = "test-redis-gateway-0123456789"
GATEWAY_PG_PASSWORD = "test-pg-gateway-0123456789"
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "AddressSanitizer:DEADLYSIGNAL")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=15.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # dict, lower-case names
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


def http(method, url, body=None, headers=None, timeout=30.0):
    """One HTTP call on a fresh connection. body: bytes, str or JSON-able object."""
    u = urllib.parse.urlsplit(url)
    conn = http_client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    hdrs = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        hdrs.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode()
    path = u.path + ("?" + u.query if u.query else "")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def auth(key):
    """The headers that present API key KEY."""
    return {"Authorization": f"Bearer {key}"}


def raw_http(port, data, timeout=10.0):
    """Sends DATA bytes on a fresh socket and returns everything read until the
    peer closes (or resets) it: for requests http.client refuses to send."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = []
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            out.append(b)
        return b"".join(out)
    finally:
        s.close()


class Proc:
    def __init__(self, name, argv, env, logpath, port=None, stderr=None):
        """STDERR: where the process's stderr goes instead of its log file
        (a file object or descriptor, e.g. a pipe's write end); then only
        stdout is in the log, and output() and the sanitizer scan see that."""
        self.name = name
        self.argv = argv
        self.env = env
        self.logpath = logpath
        self.port = port
        self.log = open(logpath, "ab")
        self.p = subprocess.Popen(argv, env=env, stdout=self.log,
                                  stderr=subprocess.STDOUT if stderr is None else stderr,
                                  stdin=subprocess.DEVNULL)
        if port:
            wait_port(port, proc=self.p)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def alive(self):
        return self.p.poll() is None

    def kill9(self):
        if self.alive():
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def signal(self, sig):
        self.p.send_signal(sig)

    def stop(self, timeout=20.0):
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                self.log.close()
                return None
        self.log.close()
        return self.p.returncode

    def output(self):
        with open(self.logpath, "rb") as f:
            return f.read().decode(errors="replace")


class Stack:
    def __init__(self, bindir):
        self.bindir = bindir
        self.dir = None
        self.env = None
        self.procs = []
        self.billing = None
        self.gateway = None
        self.devsim = None
        self._scanned = {}

    # ---- lifecycle -------------------------------------------------------
    def start(self):
        self.dir = tempfile.mkdtemp(prefix="pointgate-test-")
        subprocess.run([os.path.join(ROOT, "scripts/stack.sh"), "start", self.dir], check=True,
                       stdout=subprocess.DEVNULL,
                       env=dict(os.environ, STACK_REDIS_PASSWORD=REDIS_PASSWORD,
                                STACK_GATEWAY_REDIS_PASSWORD=GATEWAY_REDIS_PASSWORD,
                                STACK_GATEWAY_PG_PASSWORD=GATEWAY_PG_PASSWORD))
        env = dict(os.environ)
        with open(os.path.join(self.dir, "env")) as f:
            for line in f:
                line = line.strip()
                if line.startswith("export "):
                    k, v = line[len("export "):].split("=", 1)
                    env[k] = v.strip('"')
        env.update({
            "KEY_PEPPER": PEPPER,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "FINANCE_TOKEN": FINANCE_TOKEN,
            "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
            "UBSAN_OPTIONS": "print_stacktrace=1",
            "LOG_LEVEL": "info",
            # Spill files (gateway/spill.h) of this stack only: never replayed into another's Redis.
            "GATEWAY_SPILL_DIR": os.path.join(self.dir, "spill"),
            # Tests feed charges of past months: no month closes by itself
            # (test_ledger_retention closes them on purpose).
            "STATEMENT_CLOSE_DAYS": "0",
        })
        self.env = env
        self.redis_port = int(env["REDIS_PORT_STACK"])
        self.pg_port = int(env["PGPORT_STACK"])
        self.redis_url = env["REDIS_URL"]  # admin: the default user
        self.redis_password = env["REDIS_PASSWORD"]
        self.gateway_redis_url = env.pop("GATEWAY_REDIS_URL")
        self.gateway_database_url = env.pop("GATEWAY_DATABASE_URL")
        # Passwords, ACL user, maxmemory: a test that starts redis-server by
        # hand (e.g. without its AOF) passes this file first.
        self.redis_conf = os.path.join(self.dir, "redis", "redis.conf")
        self.run_billing("migrate")
        return self

    def stop(self):
        """Stops every process; returns sanitizer or exit-code complaints, '' if clean."""
        problems = []
        for p in self.procs:
            was_alive = p.alive()
            rc = p.stop()
            if was_alive and rc not in (0, -signal.SIGTERM):
                problems.append(f"{p.name} exited with {rc} on SIGTERM")
        problems.append(self.sanitizer_reports())
        if self.dir:
            subprocess.run([os.path.join(ROOT, "scripts/stack.sh"), "stop", self.dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not os.environ.get("KEEP_STACK"):
                shutil.rmtree(self.dir, ignore_errors=True)
        return "\n".join(p for p in problems if p)

    def service(self, action):
        """Takes a store away or brings it back on the same port:
        action is pg-stop, pg-start, redis-stop or redis-start."""
        p = subprocess.run([os.path.join(ROOT, "scripts/stack.sh"), action, self.dir],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"stack.sh {action} failed: {p.stderr}")

    def start_cluster(self):
        """A Redis Cluster beside the stack (stack.sh cluster-start: 3
        masters, 3 replicas, the stack's passwords and ACL user). Sets
        cluster_url (admin), gateway_cluster_url and cluster_ports (masters
        first); stopped with the stack."""
        self.service("cluster-start")
        with open(os.path.join(self.dir, "env")) as f:
            for line in f:
                line = line.strip()
                if line.startswith("export CLUSTER_") or line.startswith("export GATEWAY_CLUSTER_"):
                    k, v = line[len("export "):].split("=", 1)
                    setattr(self, k.lower(), v.strip('"'))
        self.cluster_ports = [int(p) for p in self.cluster_ports.split()]
        return self.cluster_url

    def cluster_cli(self, port, *args):
        """redis-cli on one cluster node as the admin; stdout, stripped."""
        env = dict(os.environ, REDISCLI_AUTH=self.redis_password)
        p = subprocess.run(["redis-cli", "-p", str(port), "--no-auth-warning", "--raw", *args],
                           capture_output=True, text=True, timeout=30, env=env)
        return p.stdout.strip()

    def sanitizer_reports(self):
        out = []
        for p in self.procs:
            text = p.output()
            start = self._scanned.get(p.logpath, 0)
            self._scanned[p.logpath] = len(text)
            new = text[start:]
            if any(m in new for m in SANITIZER_MARKERS):
                out.append(f"--- sanitizer report in {p.name} ---\n{new[-6000:]}")
        return "\n".join(out)

    # ---- processes -------------------------------------------------------
    def bin(self, name):
        return os.path.join(self.bindir, name)

    def run_billing(self, *args, env=None, check=True, input=None):
        e = dict(self.env)
        e.update(env or {})
        p = subprocess.run([self.bin("billing")] + list(args), env=e, capture_output=True,
                           text=True, timeout=120, input=input)
        if check and p.returncode != 0:
            raise RuntimeError(f"billing {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def gateway_env(self):
        """The gateway's least-privilege credentials, as its environment."""
        return {"REDIS_URL": self.gateway_redis_url, "DATABASE_URL": self.gateway_database_url}

    def spawn(self, name, argv, env=None, port=None, stderr=None):
        e = dict(self.env)
        prog = os.path.basename(argv[0])
        if prog == "gateway":
            e.update(self.gateway_env())
        # Every gateway and billing serve gets its own ops port (several run
        # at once in some tests; the defaults would collide): proc.ops_url.
        ops_var = {"gateway": "GATEWAY_OPS_LISTEN", "billing": "BILLING_OPS_LISTEN"}.get(prog)
        if ops_var:
            e[ops_var] = f"127.0.0.1:{free_port()}"
        e.update(env or {})
        log = os.path.join(self.dir, f"{name}.{len(self.procs)}.log")
        p = Proc(name, argv, e, log, port, stderr)
        p.ops_url = None
        if ops_var and e.get(ops_var):
            p.ops_url = "http://" + e[ops_var]
        self.procs.append(p)
        return p

    def start_billing(self, env=None):
        port = free_port()
        # Short intervals so that tests see repairs and takeovers in seconds.
        e = {"BILLING_LISTEN": f"127.0.0.1:{port}", "SWEEP_INTERVAL_MS": "200",
             "SETTLE_CLAIM_IDLE_MS": "2000", "CREDIT_SYNC_INTERVAL_MS": "3000"}
        e.update(env or {})
        self.billing = self.spawn("billing", [self.bin("billing"), "serve"], e, port)
        self.admin_url = self.billing.url
        return self.billing

    def wait_epoch(self, timeout=20.0):
        """Until billing's first repair pass wrote pg:epoch: before it, the
        gateway rightly answers 503 for a key it cannot find (the data may
        be missing), which a test of the 401 must not race."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.redis_raw("EXISTS", "pg:epoch") == "1":
                return
            time.sleep(0.05)
        raise AssertionError("billing wrote no pg:epoch")

    def start_devsim(self, env=None):
        port = free_port()
        e = {"DEVSIM_LISTEN": f"127.0.0.1:{port}"}
        e.update(env or {})
        self.devsim = self.spawn("devsim", [self.bin("devsim")], e, port)
        return self.devsim

    def write_routes(self, routes):
        path = os.path.join(self.dir, f"routes.{time.time_ns()}.json")
        with open(path, "w") as f:
            json.dump(routes, f)
        return path

    def start_gateway(self, routes=None, env=None, upstream=None):
        port = free_port()
        if routes is None:
            routes = DEFAULT_ROUTES
        if upstream is None:
            upstream = self.devsim.url
        e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": upstream,
             "ROUTES_FILE": self.write_routes(routes)}
        e.update(env or {})
        self.gateway = self.spawn("gateway", [self.bin("gateway")], e, port)
        return self.gateway

    # ---- data access -------------------------------------------------------
    def psql(self, sql):
        """Rows of a query as lists of strings (psql -At). Tests only: literal SQL."""
        p = subprocess.run(["psql", self.env["DATABASE_URL"], "-At", "-F", "\t", "-v",
                            "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"psql failed: {p.stderr}")
        return [line.split("\t") for line in p.stdout.splitlines() if line != ""]

    def scalar(self, sql):
        rows = self.psql(sql)
        return rows[0][0] if rows else None

    def redis_cli(self, *args, user=None, password=None, raw=True):
        """redis-cli on the stack's Redis, as the admin (default user) unless
        USER/PASSWORD say otherwise; the password goes by environment."""
        argv = ["redis-cli", "-p", str(self.redis_port), "--no-auth-warning",
                "--raw" if raw else "--no-raw"]
        if user:
            argv += ["--user", user]
        env = dict(os.environ, REDISCLI_AUTH=password or self.redis_password)
        return subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True,
                              timeout=30, env=env)

    def redis(self, *args):
        return self.redis_cli(*args, raw=False).stdout.strip()

    def redis_raw(self, *args):
        return self.redis_cli(*args).stdout.strip()

    def hot(self, account_id):
        """The account's Redis hash as a dict of ints."""
        out = self.redis_raw("HGETALL", f"pg:{{{account_id}}}:acct").splitlines()
        return {out[i]: int(out[i + 1]) for i in range(0, len(out) - 1, 2)}

    # ---- admin API ---------------------------------------------------------
    def admin(self, method, path, body=None, token=ADMIN_TOKEN, headers=None):
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return http(method, self.admin_url + path, body, h)

    def new_account(self, points=0, name="acme"):
        """Creates an account with POINTS credited and a key: (account_id, api_key)."""
        r = self.admin("POST", "/v1/accounts", {"name": name})
        assert r.status == 201, r
        acct = r.json()["id"]
        if points:
            r = self.admin("POST", f"/v1/accounts/{acct}/topups",
                           {"amount": points, "reference": f"seed-{acct}-{time.time_ns()}"})
            assert r.status == 201, r
        r = self.admin("POST", f"/v1/accounts/{acct}/keys")
        assert r.status == 201, r
        return acct, r.json()["api_key"]

    def new_account_in_redis(self, points):
        """new_account(POINTS) once its credit has reached Redis (billing's
        credit sync may lag the API call): (account_id, api_key)."""
        acct, key = self.new_account(points)
        self.wait_for(lambda: self.hot(acct).get("credited") == points, timeout=15,
                      what="credit in redis")
        return acct, key

    def wait_for(self, cond, timeout=20.0, what="condition"):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = cond()
            if last:
                return last
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what} (last: {last!r})")

    def leases(self):
        """Open point leases (gateway/lease.c): {holds key: [field, ...]}."""
        out = {}
        for key in self.redis_raw("KEYS", "pg:{*}:holds").splitlines():
            flat = self.redis_raw("HGETALL", key).splitlines()
            fields = [flat[i] for i in range(0, len(flat) - 1, 2) if "|~lease|" in flat[i + 1]]
            if fields:
                out[key] = fields
        return out

    def drained(self):
        """True when the outbox is fully applied (no unacknowledged entries)
        and the gateways gave their idle leases back (GATEWAY_LEASE_IDLE_MS):
        then every account's held is its calls in flight. A Redis that does
        not answer is not drained (redis-cli then prints nothing)."""
        length = self.redis_raw("XLEN", "pg:outbox")
        if not length.isdigit():
            return False
        pending = self.redis_raw("XPENDING", "pg:outbox", "settle").splitlines()
        return int(length) == 0 and (not pending or pending[0] == "0") and not self.leases()


DEFAULT_ROUTES = {
    "charge_on": ["2xx", "3xx"],
    "routes": [
        {"id": "device.read", "method": "GET", "path": "/v1/devices/*", "price": 1},
        {"id": "device.command", "method": "POST", "path": "/v1/devices/*/commands", "price": 5},
        {"id": "device.batch", "method": "POST", "path": "/v1/batch", "hold": 100,
         "unit_price": 2, "units_header": "X-Usage-Units"},
    ],
}
