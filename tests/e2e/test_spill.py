"""bin/gateway's graceful stop never loses an answered charge (issue 10, item 2).

SIGTERM while Redis is away: the gateway keeps resending its queued settles
and lease records for GATEWAY_DRAIN_TIMEOUT_MS; if Redis comes back within
it, every answered charge lands as a commit. Past it, what is undelivered is
written to a spill file in GATEWAY_SPILL_DIR and replayed at the next start
(settle.lua `late`, lease.lua close `late`, settlement's upgrade of an
expire row): Postgres then holds exactly the points the answers said
(X-Points-Charged), a second replay of the same file changes nothing, and
no balance goes below zero. The same when the resend queue overflows.

The replay tests need billing's side of the late settles (settle.lua,
lease.lua and settlement.c: the `late` outcome and pg:{A}:swept:<rid>).
"""
import glob
import os
import shutil
import signal
import threading
import time
import uuid

import harness
from harness import auth, http

# Holds expire 2 s + HOLD_GRACE_MS after the reserve: the sweeper takes them
# soon after a gateway went away.
ROUTES = {
    "charge_on": ["2xx", "3xx"],
    "routes": [dict(r, timeout_ms=2000) if r["id"] == "device.read" else r
               for r in harness.DEFAULT_ROUTES["routes"]],
}
PATH = "/v1/devices/d1"


def _setup(stack):
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    # Set by billing after a rebuild from Postgres (h5b); by hand until then.
    stack.redis("SET", "pg:epoch", "test")


def _spill_dir(stack, name):
    """A spill directory of this attempt only: the runner retries a failed
    test once on the same stack, and a file the first attempt left must not
    be replayed into the retry."""
    return os.path.join(stack.dir, f"spill-{name}-{uuid.uuid4().hex[:12]}")


def _gateway(stack, spill, env=None):
    port = harness.free_port()
    e = {"GATEWAY_LISTEN": f"127.0.0.1:{port}", "UPSTREAM_URL": stack.devsim.url,
         "ROUTES_FILE": stack.write_routes(ROUTES), "GATEWAY_SPILL_DIR": spill,
         "HOLD_GRACE_MS": "1000", "GATEWAY_THREADS": "1"}
    e.update(env or {})
    return stack.spawn("gateway-spill", [stack.bin("gateway")], e, port)


def _start_calls(gw, key, n, path=PATH, delay=1500):
    """N calls the upstream holds DELAY ms, each on its own thread: (their
    answers, filled in as they come; the threads)."""
    out = [None] * n

    def call(i):
        out[i] = http("GET", gw.url + path, timeout=30,
                      headers=dict(auth(key), **{"X-Sim-Delay-Ms": str(delay)}))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return out, threads


def _calls_during_outage(stack, gw, key, n, path=PATH, delay=1500, acct=None):
    """N calls sent, Redis stopped while they are at the upstream; returns
    their answers (all answered by the upstream: charged, to come)."""
    out, threads = _start_calls(gw, key, n, path, delay)
    if acct is not None:
        stack.wait_for(lambda: stack.hot(acct).get("held", 0) >= n, timeout=10,
                       what=f"{n} holds")
    else:
        time.sleep(0.5)
    stack.service("redis-stop")
    for t in threads:
        t.join(30)
    for r in out:
        assert r is not None and r.status == 200, r
    return out


def _charged(answers):
    return sum(int(r.headers.get("x-points-charged", "0")) for r in answers)


def _rids(answers):
    return [r.headers["x-request-id"] for r in answers]


def _pg_rows(stack, rids):
    ids = ",".join(f"'{r}'" for r in rids)
    return stack.psql(f"SELECT reservation_id, outcome, amount FROM charges "
                      f"WHERE reservation_id IN ({ids}) ORDER BY 1")


def _spill_files(spill):
    return sorted(glob.glob(os.path.join(spill, "spill-*.log")))


def _spent(stack, acct):
    """The account's spent points in Postgres."""
    return int(stack.scalar(f"SELECT spent FROM accounts WHERE id = {acct}"))


def _wait_spent(stack, acct, points):
    stack.wait_for(lambda: _spent(stack, acct) == points, timeout=30, what=f"spent {points}")


def _all_late(stack, rids):
    """True when every one of RIDS is charged 1 in Postgres as `late`."""
    rows = _pg_rows(stack, rids)
    return len(rows) == len(rids) and all(r[1] == "late" and r[2] == "1" for r in rows)


def _warm_lease(stack, gw, key, calls=20):
    """CALLS calls on a rich account, until a point lease serves it (a
    per-call hold starts one): returns the points they charged."""
    for _ in range(calls):
        assert http("GET", gw.url + PATH, headers=auth(key)).status == 200
    stack.wait_for(lambda: stack.leases(), timeout=10, what="a lease")
    return calls


def _leased_gateway(stack, tag, env=None):
    """A gateway on its own spill directory TAG, and a rich account whose
    calls it serves from a point lease: (spill, acct, key, gw, warm), warm
    being the points the warm-up charged."""
    spill = _spill_dir(stack, tag)
    acct, key = stack.new_account_in_redis(1_000_000)
    gw = _gateway(stack, spill, env)
    return spill, acct, key, gw, _warm_lease(stack, gw, key)


def _replayed_by_a_new_gateway(stack, spill, what="spill replayed"):
    """A gateway started on SPILL, once it has replayed (and deleted) the
    files there."""
    gw = _gateway(stack, spill)
    stack.wait_for(lambda: _spill_files(spill) == [], timeout=30, what=what)
    return gw


def _replayed_after_the_sweep(stack, spill, acct, charged):
    """Once the sweeper has released the lease, a new gateway replays SPILL:
    the account's spent comes to CHARGED."""
    stack.wait_for(lambda: not stack.leases(), timeout=60, what="lease swept")
    gw = _replayed_by_a_new_gateway(stack, spill)
    stack.wait_for(stack.drained, timeout=60, what="outbox drained")
    _wait_spent(stack, acct, charged)
    gw.stop()


def _linked_gateway(stack, name, env=None):
    """A gateway that reaches Redis through a _Link: (gateway, link)."""
    link = _Link(stack.redis_port)
    url = stack.gateway_redis_url.replace(f":{stack.redis_port}/", f":{link.port}/")
    assert url != stack.gateway_redis_url, url
    return _gateway(stack, _spill_dir(stack, name), dict(env or {}, REDIS_URL=url)), link


def _wait_exit(stack, gw, timeout=60):
    stack.wait_for(lambda: not gw.alive(), timeout=timeout, what="gateway exited")
    assert gw.p.returncode == 0, gw.p.returncode


def test_sigterm_while_redis_away_then_back_commits_every_answered_charge(stack):
    """(a) Redis away while calls are answered, SIGTERM, Redis back within the
    drain timeout: every answered charge is in Postgres as a commit. Before
    the fix the gateway left at once and they ended `expire, 0`."""
    _setup(stack)
    spill = _spill_dir(stack, "a")
    acct, key = stack.new_account_in_redis(100)
    gw = _gateway(stack, spill)
    try:
        answers = _calls_during_outage(stack, gw, key, 5, acct=acct)
        assert _charged(answers) == 5
        gw.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert gw.alive(), "left before its settles were delivered"
    finally:
        stack.service("redis-start")
    _wait_exit(stack, gw)
    assert _spill_files(spill) == []
    rids = _rids(answers)
    stack.wait_for(lambda: len(_pg_rows(stack, rids)) == 5, timeout=30, what="5 charges in pg")
    rows = _pg_rows(stack, rids)
    assert all(r[1] == "commit" and r[2] == "1" for r in rows), rows
    assert _spent(stack, acct) == 5


def test_drain_timeout_spills_then_next_start_replays_exactly_once(stack):
    """(b) Redis away past a short drain timeout: a spill file is written and
    the gateway exits; the sweeper expires the holds (expire, 0); the next
    start replays the file: Postgres charges equal the answered ones exactly,
    and a second replay of the same file changes nothing."""
    _setup(stack)
    spill = _spill_dir(stack, "b")
    acct, key = stack.new_account_in_redis(100)
    gw = _gateway(stack, spill, {"GATEWAY_DRAIN_TIMEOUT_MS": "300"})
    try:
        answers = _calls_during_outage(stack, gw, key, 5, acct=acct)
        assert _charged(answers) == 5
        gw.signal(signal.SIGTERM)
        _wait_exit(stack, gw, timeout=30)
        files = _spill_files(spill)
        assert len(files) == 1, files
        body = open(files[0]).read()
        assert sum(1 for ln in body.splitlines() if ln.startswith("S ")) == 5, body
        for rid in _rids(answers):
            assert f"S {rid} {acct} 1 late 200" in body, body
        saved = spill + ".copy"
        shutil.copy(files[0], saved)
    finally:
        stack.service("redis-start")
    rids = _rids(answers)
    # The sweeper expires the holds: Postgres says expire, 0.
    stack.wait_for(lambda: len(_pg_rows(stack, rids)) == 5, timeout=60, what="holds expired")
    rows = _pg_rows(stack, rids)
    assert all(r[1] == "expire" and r[2] == "0" for r in rows), rows
    assert _spent(stack, acct) == 0

    gw = _replayed_by_a_new_gateway(stack, spill)

    stack.wait_for(lambda: _all_late(stack, rids), timeout=30,
                   what="expire rows upgraded by the replay")
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    spent = _spent(stack, acct)
    assert spent == _charged(answers) == 5
    assert stack.hot(acct)["spent"] == 5
    gw.stop()

    # Replayed again (as after a crash before the delete): no change.
    os.makedirs(spill, exist_ok=True)
    shutil.copy(saved, os.path.join(spill, os.path.basename(files[0])))
    gw = _replayed_by_a_new_gateway(stack, spill, "second replay")
    time.sleep(1.0)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    assert _spent(stack, acct) == 5
    assert stack.hot(acct)["spent"] == 5
    assert all(r[1] == "late" and r[2] == "1" for r in _pg_rows(stack, rids))
    gw.stop()


def test_replay_never_overdraws(stack):
    """A spilled charge replayed after the account's points went elsewhere
    charges only what is available: never an overdraft."""
    _setup(stack)
    spill = _spill_dir(stack, "c")
    acct, key = stack.new_account_in_redis(5)
    gw = _gateway(stack, spill, {"GATEWAY_DRAIN_TIMEOUT_MS": "300"})
    try:
        answers = _calls_during_outage(stack, gw, key, 3, acct=acct)
        gw.signal(signal.SIGTERM)
        _wait_exit(stack, gw, timeout=30)
        assert len(_spill_files(spill)) == 1
    finally:
        stack.service("redis-start")
    rids = _rids(answers)
    stack.wait_for(lambda: len(_pg_rows(stack, rids)) == 3, timeout=60, what="holds expired")
    # Meanwhile the points are spent by other calls (another gateway).
    gw2 = _gateway(stack, _spill_dir(stack, "c2"))
    for _ in range(4):
        assert http("GET", gw2.url + PATH, headers=auth(key)).status == 200
    gw2.stop()
    gw = _replayed_by_a_new_gateway(stack, spill)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    spent = _spent(stack, acct)
    assert spent == 5, spent  # 4 + 1 of the 3 spilled: no more than credited
    h = stack.hot(acct)
    assert h["spent"] == 5 and h["credited"] - h["spent"] - h["held"] >= 0, h
    gw.stop()


def test_resend_queue_overflow_spills_and_fails_closed(stack):
    """The resend queue is bounded (GATEWAY_SETTLE_QUEUE_MAX): past it the
    settles go to the spill file at once (not dropped) and the worker
    refuses new reserves (503) until, Redis back, it has replayed them
    itself; every answered charge lands once."""
    _setup(stack)
    spill = _spill_dir(stack, "d")
    acct, key = stack.new_account_in_redis(100)
    gw = _gateway(stack, spill, {"GATEWAY_SETTLE_QUEUE_MAX": "2"})
    try:
        answers = _calls_during_outage(stack, gw, key, 6, acct=acct)
        assert _charged(answers) == 6
        files = _spill_files(spill)
        assert len(files) == 1, files  # written while running
        assert open(files[0]).read().count("S ") == 4
        assert "refusing reserves" in gw.output()
    finally:
        stack.service("redis-start")
    stack.wait_for(lambda: _spill_files(spill) == [], timeout=30, what="replayed while running")
    stack.wait_for(lambda: http("GET", gw.url + PATH, headers=auth(key)).status == 200,
                   timeout=10, what="served again")
    assert "spilled settles replayed: serving again" in gw.output()
    rids = _rids(answers)
    stack.wait_for(lambda: len(_pg_rows(stack, rids)) == 6, timeout=30, what="6 charges")
    assert all(r[2] == "1" for r in _pg_rows(stack, rids)), _pg_rows(stack, rids)
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    _wait_spent(stack, acct, 7)  # 6 + 1
    gw.stop()


def test_leased_calls_spilled_and_replayed(stack):
    """(c) The same with calls served from a point lease (a big account):
    records not in Redis at the drain timeout are spilled as lease ops and
    replayed with close `late` after the sweeper released the lease."""
    _setup(stack)
    # Warm up: a lease is started by a per-call hold on a rich account.
    spill, acct, key, gw, warm = _leased_gateway(stack, "e", {"GATEWAY_DRAIN_TIMEOUT_MS": "300"})
    try:
        answers = _calls_during_outage(stack, gw, key, 8)
        gw.signal(signal.SIGTERM)
        _wait_exit(stack, gw, timeout=30)
        files = _spill_files(spill)
        assert len(files) == 1, files
        body = open(files[0]).read()
        assert "\nL " in "\n" + body or body.count("S ") == 8, body
    finally:
        stack.service("redis-start")
    charged = _charged(answers) + warm
    # The lease (or holds) expire; then the replay charges what was answered.
    _replayed_after_the_sweep(stack, spill, acct, charged)


def test_a_spill_file_another_process_holds_is_left_to_it(stack):
    """Two gateways sharing GATEWAY_SPILL_DIR never both replay a file: one
    that another process holds locked (flock) is skipped and kept; free, it
    is replayed and deleted. A last line cut short (a crash while writing)
    is skipped."""
    import fcntl
    _setup(stack)
    spill = _spill_dir(stack, "f")
    os.makedirs(spill, exist_ok=True)
    acct, key = stack.new_account_in_redis(10)
    path = os.path.join(spill, "spill-1-0-1.log")
    with open(path, "w") as f:
        # Settled already (no hold, no swept mark): the replay is a no-op.
        f.write(f"S {'ab' * 16} {acct} 1 late 200\nS {'cd' * 16} {acct} 1 la")
    holder = open(path, "r+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    gw = _gateway(stack, spill)
    time.sleep(1.5)
    assert os.path.exists(path)
    assert "held by another process" in gw.output()
    gw.stop()
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    gw = _gateway(stack, spill)
    stack.wait_for(lambda: not os.path.exists(path), timeout=20, what="replayed and deleted")
    assert "cut short" in gw.output()
    assert stack.hot(acct)["spent"] == 0
    assert http("GET", gw.url + PATH, headers=auth(key)).status == 200
    gw.stop()


def test_sigterm_while_redis_away_delivers_leased_calls_when_it_is_back(stack):
    """(a) with a point lease: records of calls served from a lease while
    Redis was away are resent during the drain once Redis is back; every
    answered charge lands, nothing is spilled."""
    _setup(stack)
    spill, acct, key, gw, warm = _leased_gateway(stack, "g")
    try:
        answers = _calls_during_outage(stack, gw, key, 8)
        gw.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert gw.alive(), "left before its lease records were delivered"
    finally:
        stack.service("redis-start")
    _wait_exit(stack, gw)
    assert _spill_files(spill) == []
    charged = _charged(answers) + warm
    stack.wait_for(stack.drained, timeout=30, what="outbox drained, lease given back")
    _wait_spent(stack, acct, charged)
    assert stack.hot(acct)["spent"] == charged


class _Link:
    """A TCP relay between the gateway and Redis that the test can cut and
    restore on the same port: the gateway alone loses Redis (a network
    partition), while billing (its sweeper, settlement) keeps it."""

    def __init__(self, target_port):
        import socket
        self.socket = socket
        self.target = target_port
        self.port = harness.free_port()
        self.conns = []
        self.lock = threading.Lock()
        self.lsock = None
        self.restore()

    def _pump(self, src, dst):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(self.socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self, lsock):
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            try:
                u = self.socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    def restore(self):
        s = self.socket.socket()
        s.setsockopt(self.socket.SOL_SOCKET, self.socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self.lsock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self):
        try:  # wakes the accept() (a close alone leaves it listening)
            self.lsock.shutdown(self.socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(self.socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_queued_commit_outlives_the_sweep_of_its_hold(stack):
    """The gateway alone loses Redis (billing keeps it) while calls are at
    the upstream: their answers say charged, their settles wait in the
    resend queue, and meanwhile the sweeper expires the holds (expire, 0).
    Once the link is back the queued settles must still charge them (as
    `late`: the swept marks are there), exactly once. Before the fix they
    were resent as plain commits, which find no hold and change nothing:
    answered charges lost."""
    _setup(stack)
    acct, key = stack.new_account_in_redis(100)
    gw, link = _linked_gateway(stack, "h")
    out, threads = _start_calls(gw, key, 5)
    restored = False
    try:
        stack.wait_for(lambda: stack.hot(acct).get("held", 0) >= 5, timeout=10, what="5 holds")
        link.cut()
        for t in threads:
            t.join(30)
        assert all(r is not None and r.status == 200 for r in out), out
        assert _charged(out) == 5
        rids = _rids(out)
        # Billing still sees Redis: the holds expire, Postgres says expire, 0.
        stack.wait_for(lambda: len(_pg_rows(stack, rids)) == 5, timeout=60, what="holds expired")
        rows = _pg_rows(stack, rids)
        assert all(r[1] == "expire" and r[2] == "0" for r in rows), (rows, gw.output()[-3000:])
        link.restore()
        restored = True
        stack.wait_for(lambda: "resending" in gw.output(), timeout=30, what="queued settles resent")
        stack.wait_for(lambda: _all_late(stack, rids), timeout=30,
                       what=f"5 answered charges in pg: {_pg_rows(stack, rids)}")
        stack.wait_for(stack.drained, timeout=30, what="outbox drained")
        assert _spent(stack, acct) == 5
        assert stack.hot(acct)["spent"] == 5
    finally:
        if not restored:
            link.restore()
        gw.stop()
        link.cut()


def test_queued_lease_records_outlive_the_sweep_of_their_lease(stack):
    """The same with calls served from a point lease: the lease's op fails
    (the gateway alone lost Redis), its calls are answered with the charge
    to come, and the sweeper releases the whole lease past its deadline
    (cost 0, swept mark). The op resent once the link is back must still
    charge them, once. Before the fix it found no lease (status 0) and the
    answered charges were dropped."""
    _setup(stack)
    acct, key = stack.new_account_in_redis(1_000_000)
    gw, link = _linked_gateway(stack, "i", {"UPSTREAM_TIMEOUT_MS": "2000",
                                            "GATEWAY_LEASE_IDLE_MS": "60000"})
    warm = _warm_lease(stack, gw, key)
    out, threads = _start_calls(gw, key, 8)
    restored = False
    try:
        time.sleep(0.5)
        link.cut()
        for t in threads:
            t.join(30)
        assert all(r is not None and r.status == 200 for r in out), out
        charged = _charged(out) + warm
        assert _charged(out) == 8
        # Billing still sees Redis: the lease is released whole (cost 0).
        stack.wait_for(lambda: not stack.leases(), timeout=60, what="lease swept")
        stack.wait_for(lambda: int(stack.redis_raw("XLEN", "pg:outbox") or 0) == 0, timeout=30,
                       what="outbox applied")
        link.restore()
        restored = True
        stack.wait_for(lambda: _spent(stack, acct)
                       == charged, timeout=30,
                       what=f"spent {charged}: " + str(stack.scalar(
                           f"SELECT spent FROM accounts WHERE id = {acct}")))
        stack.wait_for(stack.drained, timeout=30, what="outbox drained")
        time.sleep(1.0)
        assert _spent(stack, acct) == charged
        assert stack.hot(acct)["spent"] == charged
    finally:
        if not restored:
            link.restore()
        gw.stop()
        link.cut()


def test_sigkill_during_the_drain_loses_no_answered_charge(stack):
    """SIGTERM while Redis is away, then SIGKILL before the drain ends (an
    orchestrator's grace shorter than GATEWAY_DRAIN_TIMEOUT_MS: docker stop
    waits 10 s, the default drain 30 s). The drain keeps a snapshot of what
    is undelivered on disk, so the next start replays it: every answered
    charge lands once. Before the fix nothing was written until the drain's
    end, and a SIGKILL lost them all (expire, 0)."""
    _setup(stack)
    spill = _spill_dir(stack, "j")
    acct, key = stack.new_account_in_redis(100)
    gw = _gateway(stack, spill, {"GATEWAY_DRAIN_TIMEOUT_MS": "120000"})
    try:
        answers = _calls_during_outage(stack, gw, key, 5, acct=acct)
        assert _charged(answers) == 5
        gw.signal(signal.SIGTERM)
        time.sleep(2.5)
        assert gw.alive(), "the drain ended early"
        gw.kill9()
        files = _spill_files(spill)
        assert len(files) == 1, files
        body = open(files[0]).read()
        for rid in _rids(answers):
            assert f"S {rid} {acct} 1 late 200" in body, body
        assert oct(os.stat(files[0]).st_mode & 0o777) == "0o600"
    finally:
        stack.service("redis-start")
    rids = _rids(answers)
    stack.wait_for(lambda: len(_pg_rows(stack, rids)) == 5, timeout=60, what="holds expired")
    gw = _replayed_by_a_new_gateway(stack, spill)
    stack.wait_for(lambda: _all_late(stack, rids), timeout=30, what="answered charges in pg")
    stack.wait_for(stack.drained, timeout=30, what="outbox drained")
    assert _spent(stack, acct) == 5
    gw.stop()


def test_sigkill_during_the_drain_keeps_leased_calls(stack):
    """The same with calls served from a point lease: the snapshot holds the
    lease's ops; replayed after the sweeper released the lease, they charge
    every answered call once."""
    _setup(stack)
    spill, acct, key, gw, warm = _leased_gateway(stack, "k",
                                                 {"GATEWAY_DRAIN_TIMEOUT_MS": "120000"})
    try:
        answers = _calls_during_outage(stack, gw, key, 8)
        gw.signal(signal.SIGTERM)
        time.sleep(2.5)
        assert gw.alive(), "the drain ended early"
        gw.kill9()
        files = _spill_files(spill)
        assert len(files) == 1, files
    finally:
        stack.service("redis-start")
    charged = _charged(answers) + warm
    _replayed_after_the_sweep(stack, spill, acct, charged)


def test_a_spill_file_of_another_user_is_not_replayed(stack):
    """A replayed item moves points (a release frees a hold at cost 0): a
    spill file this gateway's user did not write (GATEWAY_SPILL_DIR set to a
    shared directory), or a symlink, is left alone and logged, never
    replayed. Before the fix any spill-*.log found was replayed."""
    _setup(stack)
    spill = _spill_dir(stack, "l")
    os.makedirs(spill, exist_ok=True)
    acct, key = stack.new_account_in_redis(10)
    foreign = os.path.join(spill, "spill-1-0-1.log")
    with open(foreign, "w") as f:
        f.write(f"S {'ef' * 16} {acct} 1 late 200\n")
    os.chown(foreign, 65534, 65534)
    target = os.path.join(stack.dir, "not-a-spill.log")
    with open(target, "w") as f:
        f.write(f"S {'ab' * 16} {acct} 1 late 200\n")
    link = os.path.join(spill, "spill-1-0-2.log")
    os.symlink(target, link)
    gw = _gateway(stack, spill)
    time.sleep(1.5)
    assert os.path.exists(foreign) and os.path.lexists(link) and os.path.exists(target)
    out = gw.output()
    assert "spill-1-0-1.log: not a regular file of uid" in out, out
    assert "spill-1-0-2.log: cannot open it" in out, out
    assert http("GET", gw.url + PATH, headers=auth(key)).status == 200
    gw.stop()
