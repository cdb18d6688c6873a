"""A minimal Redis client (RESP2 over a socket, with pipelining) and wrappers
that call the real billing/*.lua scripts, for tests that drive the hot-balance
layer directly.

Nothing here reimplements the scripts: every call loads billing/reserve.lua,
settle.lua and credit.lua from the repository (SCRIPT LOAD) and runs them with
EVALSHA, with the KEYS/ARGV contract written at the top of each script and the
key layout of common/hotkeys.h.
"""
import os
import socket
import threading

from harness import REDIS_PASSWORD, ROOT

OUTBOX = "pg:outbox"
BACKLOG = "pg:backlog"


class RedisError(Exception):
    pass


def acct_key(a):
    return f"pg:{{{a}}}:acct"


def holds_key(a):
    return f"pg:{{{a}}}:holds"


def swept_key(a, rid):
    """The mark the sweeper leaves for a late (spilled) settle: settle.lua."""
    return f"pg:{{{a}}}:swept:{rid}"


def script_source(name):
    """The script as the binaries embed it: the shared prelude, then it."""
    parts = [os.path.join(ROOT, "common", "prelude.lua"),
             os.path.join(ROOT, "billing", name + ".lua")]
    out = []
    for path in parts:
        with open(path) as f:
            out.append(f.read())
    return "".join(out)


class Redis:
    """One connection. call() for one command; pipeline() for many at once.
    Error replies come back as RedisError instances (raised by call())."""

    def __init__(self, port, host="127.0.0.1", timeout=60.0, user=None, password=REDIS_PASSWORD):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.shas = {}
        if password:  # the test stack's Redis needs it (harness.REDIS_PASSWORD)
            self.call("AUTH", *([user] if user else []), password)

    def close(self):
        self.sock.close()

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, bytes):
                b = a
            else:
                b = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            return RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode(errors="replace")
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"bad reply line {line!r}")

    def pipeline(self, commands, chunk=2000):
        replies = []
        for i in range(0, len(commands), chunk):
            part = commands[i:i + chunk]
            self.sock.sendall(b"".join(self._encode(c) for c in part))
            replies.extend(self._reply() for _ in part)
        return replies

    def call(self, *args):
        r = self.pipeline([args])[0]
        if isinstance(r, RedisError):
            raise r
        return r

    # ---- the real scripts ---------------------------------------------------
    def sha(self, name):
        if name not in self.shas:
            self.shas[name] = self.call("SCRIPT", "LOAD", script_source(name))
        return self.shas[name]

    def reserve_batch_cmd(self, ops):
        """One reserve.lua call for OPS = [(acct, rid, price, ttl_ms, route), ...]."""
        keys = [k for o in ops for k in (acct_key(o[0]), holds_key(o[0]))]
        args = [x for o in ops for x in o[1:]]
        return ("EVALSHA", self.sha("reserve"), len(keys), *keys, *args)

    def settle_batch_cmd(self, ops):
        """One settle.lua call for OPS = [(acct, rid, charge, outcome, status), ...]."""
        keys = [OUTBOX] + [k for o in ops for k in (acct_key(o[0]), holds_key(o[0]))]
        args = [x for o in ops for x in (o[1], o[2], o[3], o[4], o[0])]
        return ("EVALSHA", self.sha("settle"), len(keys), *keys, *args)

    def reserve_cmd(self, acct, rid, price, ttl_ms=60000, route="device.read"):
        return self.reserve_batch_cmd([(acct, rid, price, ttl_ms, route)])

    def settle_cmd(self, acct, rid, charge, outcome="commit", status=200):
        return self.settle_batch_cmd([(acct, rid, charge, outcome, status)])

    def lease_cmd(self, acct, lid, seq, charge=0, resize=0, busy=0, records=(), ttl_ms=60000,
                  close=False):
        """One lease.lua op; RECORDS are the outbox records' strings. CLOSE:
        a bool, or the string "late" (a replayed op)."""
        fields = [x for rec in records for x in ("c", rec)]
        flag = close if isinstance(close, str) else ("1" if close else "0")
        return ("EVALSHA", self.sha("lease"), 3, acct_key(acct), holds_key(acct), OUTBOX,
                lid, seq, ttl_ms, charge, resize, busy, flag, *fields)

    def lease(self, acct, lid, seq, charge=0, resize=0, busy=0, records=(), ttl_ms=60000,
              close=False):
        """{status, amount, available, contended, records charged} as a list
        of ints."""
        return self.call(*self.lease_cmd(acct, lid, seq, charge, resize, busy, records, ttl_ms,
                                         close))

    def credit_cmd(self, acct, seq, credited, spent=0, guard=""):
        return ("EVALSHA", self.sha("credit"), 3, OUTBOX, acct_key(acct), holds_key(acct),
                seq, credited, spent, guard)

    def reserve(self, acct, rid, price, ttl_ms=60000, route="device.read"):
        """{status, available, held} as a list of ints."""
        return self.call(*self.reserve_cmd(acct, rid, price, ttl_ms, route))

    def settle(self, acct, rid, charge, outcome="commit", status=200):
        """{status, charged, available} as a list of ints."""
        return self.call(*self.settle_cmd(acct, rid, charge, outcome, status))

    def credit(self, acct, seq, credited, spent=0, guard=""):
        return self.call(*self.credit_cmd(acct, seq, credited, spent, guard))

    def hash(self, key):
        r = self.call("HGETALL", key)
        return {r[i]: r[i + 1] for i in range(0, len(r), 2)}

    def acct(self, a):
        return {k: int(v) for k, v in self.hash(acct_key(a)).items()}

    def backlog(self):
        """pg:backlog: outbox records not yet applied to Postgres."""
        return int(self.call("GET", BACKLOG) or 0)


def redis_for(stack):
    return Redis(stack.redis_port)


def entries(stack, stream=OUTBOX):
    """Every entry of a stream as (id, fields dict)."""
    r = Redis(stack.redis_port)
    try:
        out = r.call("XRANGE", stream, "-", "+")
    finally:
        r.close()
    return [(e[0], {e[1][i]: e[1][i + 1] for i in range(0, len(e[1]), 2)}) for e in out]


RECORD_FIELDS = ("rid", "acct", "route", "amount", "hold", "outcome", "status")


def records(stack, stream=OUTBOX):
    """Every call recorded in the outbox, in order, as a dict of its parts
    plus the entry's "ts" and "id" (settle.lua: one entry per batch, "ts"
    then one "c" field per call)."""
    out = []
    for eid, fields in raw_entries(stack, stream):
        assert fields[:1] == ["ts"], fields
        ts = fields[1]
        for i in range(2, len(fields), 2):
            assert fields[i] == "c", fields
            rec = dict(zip(RECORD_FIELDS, fields[i + 1].split("|")))
            rec.update(ts=ts, id=eid)
            out.append(rec)
    return out


def outbox_add(red, ts, *recs):
    """Appends one entry in settle.lua's format: RECS are tuples in
    RECORD_FIELDS order (as a foreign or older writer would, for tests),
    counted into pg:backlog as settle.lua counts its own (atomically)."""
    fields = ["ts", ts]
    for r in recs:
        fields += ["c", "|".join(str(x) for x in r)]
    return red.call("EVAL", "local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV))\n"
                    "redis.call('INCRBY', KEYS[2], (#ARGV - 2) / 2)\nreturn id",
                    2, OUTBOX, BACKLOG, *fields)


def raw_entries(stack, stream=OUTBOX):
    """Every entry of a stream as (id, [field, value, ...])."""
    r = Redis(stack.redis_port)
    try:
        return [(e[0], e[1]) for e in r.call("XRANGE", stream, "-", "+")]
    finally:
        r.close()


def run_threads(n, fn):
    """Runs fn(i) on N threads released together; returns their results in order."""
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def body(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
