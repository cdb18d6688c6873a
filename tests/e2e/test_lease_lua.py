"""billing/lease.lua on real Redis, op by op: the contract the gateway's
lease.c relies on (creation and growth bounded by the available points,
records charged and appended in one step, a resent op applied once, give
back, contention, records that do not fit charged as far as they go, late
ops replayed from a spill file, the backlog count), and the sweeper's side
of it in settle.lua (a lease expires only past its deadline, whole, at cost
0, with no outbox record, leaving the swept mark a late op needs).

The accounts here live in Redis only (credit.lua creates their hashes): no
billing runs in this module, so the outbox is read as the scripts left it.
"""
import itertools
import time

from luahelp import (OUTBOX, RedisError, acct_key, entries, holds_key, records, redis_for,
                     swept_key)

LID = "L" + "ab" * 16
# Accounts of the newer tests, a new one per attempt: the runner retries a
# failed test once on the same Redis, and a retry on the first attempt's
# account (its lease, seqs and records) could never pass.
_ACCOUNTS = itertools.count(9500001)


def _rec(rid, acct, amount, hold=1, outcome="commit", status=200, route="device.read"):
    return f"{rid}|{acct}|{route}|{amount}|{hold}|{outcome}|{status}"


def _lease_value(red, acct, lid=LID):
    v = red.call("HGET", holds_key(acct), lid)
    if v is None:
        return None
    amount, route, seq, free, dl, soft = v.split("|")
    assert route == "~lease", v
    return {"amount": int(amount), "seq": int(seq), "free": int(free), "deadline": int(dl),
            "soft": int(soft)}


def _soft_deadline_passed(red, acct):
    """Rewrites the lease's value as lease.lua wrote it but with its soft
    deadline in the past: its worker went silent (no waiting 3 s)."""
    v = _lease_value(red, acct)
    red.call("HSET", holds_key(acct), LID,
             f"{v['amount']}|~lease|{v['seq']}|{v['free']}|{v['deadline']}|1")


def _shown(a):
    return a["credited"] - a["spent"] - a["held"] + a.get("leasefree", 0)


def test_create_grow_settle_and_give_back(stack):
    red = redis_for(stack)
    acct = 900001
    red.credit(acct, 1, 1000)
    # Creation asks for 100: granted whole (at most a quarter of 1000).
    got = red.lease(acct, LID, 1, resize=100)
    assert got == [1, 100, 1000, 0, 0], (got, red.acct(acct))
    a = red.acct(acct)
    assert a["held"] == 100 and a["leasefree"] == 100 and _shown(a) == 1000, a
    assert _lease_value(red, acct)["free"] == 100
    # Three calls ended (charges 1, 1, 0) while two more are promised (busy 2).
    recs = [_rec("r1", acct, 1), _rec("r2", acct, 1), _rec("r3", acct, 0, outcome="release",
                                                          status=503)]
    n_entries = len(entries(stack))
    assert red.lease(acct, LID, 2, charge=2, busy=2, records=recs) == [1, 98, 998 - 2, 0, 3]
    a = red.acct(acct)
    assert a["spent"] == 2 and a["held"] == 98 and a["leasefree"] == 96, a
    assert _shown(a) == 1000 - 2 - 2  # the two promised points are not available
    got = entries(stack)
    assert len(got) == n_entries + 1
    mine = [r for r in records(stack) if r["acct"] == str(acct)]
    assert [(r["rid"], r["amount"], r["outcome"]) for r in mine] == [
        ("r1", "1", "commit"), ("r2", "1", "commit"), ("r3", "0", "release")]
    # Growth: asks for 400 more, gets a quarter of what is available (900 - ...).
    avail = a["credited"] - a["spent"] - a["held"]
    st, amount, _, _, _ = red.lease(acct, LID, 3, resize=400, busy=2)
    assert st == 1 and amount == 98 + avail // 4, (amount, avail)
    # Give back everything free; the two promised points stay.
    assert red.lease(acct, LID, 4, resize=-10 ** 6, busy=2)[:2] == [1, 2]
    a = red.acct(acct)
    assert a["held"] == 2 and a["leasefree"] == 0, a
    # The two calls end uncharged; the op with their records keeps the field
    # (a resend must find it) even when closing; an empty op that does not
    # close keeps it too (the sweeper may have emptied a lease whose worker
    # has calls to settle); the closing empty one drops it.
    assert red.lease(acct, LID, 5, busy=0, records=[_rec("r4", acct, 0, outcome="release"),
                                                    _rec("r5", acct, 0, outcome="release")],
                     resize=-2, close=True)[:2] == [1, 0]
    assert _lease_value(red, acct) is not None
    assert red.lease(acct, LID, 6)[:2] == [1, 0]
    assert _lease_value(red, acct) is not None
    assert red.lease(acct, LID, 7, close=True)[:2] == [1, 0]
    assert _lease_value(red, acct) is None
    a = red.acct(acct)
    assert a["held"] == 0 and a["leasefree"] == 0 and a["spent"] == 2, a


def test_resent_op_is_applied_once(stack):
    red = redis_for(stack)
    acct = 900002
    red.credit(acct, 1, 1000)
    red.lease(acct, LID, 1, resize=50)
    before = len(entries(stack))
    op = dict(charge=3, busy=0, records=[_rec(f"x{i}", acct, 1) for i in range(3)])
    first = red.lease(acct, LID, 2, **op)
    assert first[0] == 1 and first[1] == 47
    # The same op again (its reply was lost), and an older one: no change.
    assert red.lease(acct, LID, 2, **op) == [2, 47, first[2], 0, 3]
    assert red.lease(acct, LID, 1, resize=50)[0:2] == [2, 47]
    a = red.acct(acct)
    assert a["spent"] == 3 and a["held"] == 47, a
    assert len(entries(stack)) == before + 1


def test_refusals_change_nothing(stack):
    red = redis_for(stack)
    acct = 900003
    red.credit(acct, 1, 1000)
    red.lease(acct, LID, 1, resize=10)
    snap = (red.acct(acct), red.hash(holds_key(acct)), len(entries(stack)))
    # Malformed arguments: error replies.
    for bad in (dict(seq=0), dict(seq="1.5"), dict(seq=2, charge=-1), dict(seq=2, busy="x"),
                dict(seq=2, ttl_ms=0)):
        args = dict(charge=0, resize=0, busy=0, records=(), ttl_ms=60000)
        seq = bad.pop("seq")
        args.update(bad)
        r = red.pipeline([red.lease_cmd(acct, LID, seq, **args)])[0]
        assert isinstance(r, RedisError), (bad, r)
    # An odd number of entry fields, a close flag that is not 0 or 1.
    for tail in (("0", "c"), ("2",)):
        r = red.pipeline([("EVALSHA", red.sha("lease"), 3, acct_key(acct), holds_key(acct),
                           OUTBOX, LID, 2, 60000, 0, 0, 0, *tail)])[0]
        assert isinstance(r, RedisError), (tail, r)
    # A lease Redis does not have (expired, lost) settles nothing...
    assert red.lease(acct, "L" + "cd" * 16, 7, charge=1, busy=0,
                     records=[_rec("z1", acct, 1)])[0] == 0
    # ...and a new one cannot carry records.
    r = red.pipeline([red.lease_cmd(acct, "L" + "ef" * 16, 1, charge=1,
                                    records=[_rec("z2", acct, 1)])])[0]
    assert isinstance(r, RedisError), r
    assert (red.acct(acct), red.hash(holds_key(acct)), len(entries(stack))) == snap
    # An account Redis does not know gets no lease.
    assert red.lease(900099, LID, 1, resize=10)[0] == -1
    assert red.call("EXISTS", holds_key(900099)) == 0


def test_small_accounts_get_at_most_a_quarter(stack):
    red = redis_for(stack)
    acct = 900004
    red.credit(acct, 1, 10)
    assert red.lease(acct, LID, 1, resize=100)[:2] == [1, 2]  # 10 // 4
    red.credit(900005, 1, 3)
    # Less than 4 available: nothing, and no field left behind.
    assert red.lease(900005, LID, 1, resize=100)[:2] == [1, 0]
    assert red.call("EXISTS", holds_key(900005)) == 0
    assert red.acct(900005)["held"] == 0


def test_contention_stops_growth_and_is_reported(stack):
    red = redis_for(stack)
    acct = 900006
    red.credit(acct, 1, 100)
    assert red.lease(acct, LID, 1, resize=25)[:2] == [1, 25]
    # Per-call holds take the rest; the next reserve is short while the
    # lease has free points: reserve.lua marks the account contended.
    assert red.reserve(acct, "h1", 75)[0] == 1
    assert red.reserve(acct, "h2", 5) == [0, 0, 100]
    assert "contend" in red.acct(acct)
    st, amount, _, contended, _ = red.lease(acct, LID, 2, resize=50, busy=0)
    assert (st, amount, contended) == (1, 25, 1)  # no growth, and told
    # The worker then gives its free points back, and the short call fits.
    assert red.lease(acct, LID, 3, resize=-25, busy=0)[:2] == [1, 0]
    assert red.reserve(acct, "h2", 5)[0] == 1
    # A short reserve with nothing free in any lease marks nothing.
    acct2 = 900007
    red.credit(acct2, 1, 10)
    red.reserve(acct2, "g1", 10)
    assert red.reserve(acct2, "g2", 1)[0] == 0
    assert "contend" not in red.acct(acct2)


def test_sweeper_expires_a_lease_only_past_its_deadline(stack):
    red = redis_for(stack)
    acct = 900008
    red.credit(acct, 1, 1000)
    red.lease(acct, LID, 1, resize=40, ttl_ms=60000)
    before = len(entries(stack))
    # A live lease: neither an expire nor a per-call settle closes it.
    assert red.settle(acct, LID, 0, "expire", 0)[0] == 0
    assert red.settle(acct, LID, 40, "commit", 200)[0] == 0
    assert _lease_value(red, acct)["amount"] == 40
    # Renewed with a 1 ms deadline (a dead worker's last op), then expired:
    # whole, at cost 0, no outbox record.
    red.lease(acct, LID, 2, charge=2, busy=5, records=[_rec("e1", acct, 1), _rec("e2", acct, 1)],
              ttl_ms=1)
    time.sleep(0.01)
    a = red.acct(acct)
    assert a["held"] == 38 and a["leasefree"] == 33, a
    assert red.settle(acct, LID, 0, "expire", 0)[0] == 1
    assert _lease_value(red, acct) is None
    a = red.acct(acct)
    assert a["held"] == 0 and a["leasefree"] == 0 and a["spent"] == 2, a
    assert len(entries(stack)) == before + 1  # only the op's own entry
    # The worker comes back too late: its op finds no lease, charges nothing.
    assert red.lease(acct, LID, 3, charge=1, busy=0, records=[_rec("e3", acct, 1)])[0] == 0
    assert red.acct(acct)["spent"] == 2


def test_soft_deadline_gives_free_points_back_and_the_worker_retakes(stack):
    """Past a lease's soft deadline (its worker stopped renewing it) the
    sweeper's expire gives only its free points back; the calls it had in
    flight keep theirs until the deadline. A worker that comes back with
    records for points promised before it fenced itself gets them from the
    available points; when they are gone, the op is refused whole."""
    red = redis_for(stack)
    acct = 900009
    red.credit(acct, 1, 1000)
    red.lease(acct, LID, 1, resize=100)
    # An op with 10 promised; then its worker goes silent.
    red.lease(acct, LID, 2, busy=10)
    v = _lease_value(red, acct)
    assert v["deadline"] - v["soft"] > 50000 and v["free"] == 90, v
    _soft_deadline_passed(red, acct)
    assert red.settle(acct, LID, 0, "expire", 0)[0] == 1
    v = _lease_value(red, acct)
    assert (v["amount"], v["free"], v["seq"]) == (10, 0, 2), v
    a = red.acct(acct)
    assert a["held"] == 10 and a["leasefree"] == 0, a
    assert red.settle(acct, LID, 0, "expire", 0)[0] == 0  # nothing more to give
    # The worker had promised 5 more before it fenced itself: 15 busy/charged
    # against 10 held. 5 come from the available points.
    assert red.lease(acct, LID, 3, charge=12, busy=3,
                     records=[_rec(f"w{i}", acct, 1) for i in range(12)])[:2] == [1, 3]
    a = red.acct(acct)
    assert a["spent"] == 12 and a["held"] == 3 and a["credited"] - a["spent"] - a["held"] == 985, a
    # An account that cannot make up the difference: the records that fit
    # are charged, in order; the last is not (test_records_beyond_lease_...).
    red.credit(900010, 1, 20)
    red.lease(900010, LID, 1, resize=5)
    red.reserve(900010, "p1", 15)
    n = len(entries(stack))
    assert red.lease(900010, LID, 2, charge=6, busy=0,
                     records=[_rec(f"q{i}", 900010, 1) for i in range(6)]) == [1, 0, 0, 0, 5]
    a = red.acct(900010)
    assert (a["spent"], a["held"], a["leasefree"]) == (5, 15, 0), a
    assert len(entries(stack)) == n + 1
    assert [r["rid"] for r in records(stack) if r["acct"] == "900010"] == [f"q{i}" for i in range(5)]


def test_a_call_the_account_cannot_afford_leaves_leases_be(stack):
    red = redis_for(stack)
    acct = 900011
    red.credit(acct, 1, 100)
    red.lease(acct, LID, 1, resize=25)
    assert red.reserve(acct, "big", 500) == [0, 75, 25]  # 75 + 25 < 500: refused
    assert "contend" not in red.acct(acct)
    assert red.lease(acct, LID, 2, resize=10)[3] == 0


def test_records_beyond_lease_and_available_are_charged_as_far_as_they_go(stack):
    """Records that charge more than the lease holds plus what the account
    has available (the sweeper emptied the lease while its worker was cut
    off, and others spent the rest): the records are charged in order while
    they fit, the first that does not fit and all after it are neither
    charged nor appended, and the reply says how many were (its 5th
    element), also to a resend. Never an overdraft. Records the available
    points do cover are charged, and promises beyond them stay uncovered,
    not refused."""
    red = redis_for(stack)
    acct = next(_ACCOUNTS)
    red.credit(acct, 1, 100)
    red.lease(acct, LID, 1, resize=20)  # a quarter of 100
    red.reserve(acct, "p1", 70)  # 10 left available
    before = len(entries(stack))
    backlog = red.backlog()
    # 25 charged with 5 promised against 20 held: 5 more from the 10
    # available for the records, the last 5 for the promises.
    assert red.lease(acct, LID, 2, charge=25, busy=5,
                     records=[_rec("k1", acct, 25, hold=25)]) == [1, 5, 0, 0, 1]
    a = red.acct(acct)
    assert (a["spent"], a["held"], a["leasefree"]) == (25, 75, 0), a
    assert a["credited"] - a["spent"] - a["held"] == 0
    # Then 4 + 2 + 3 + 1 charged against the 5 it holds, nothing available:
    # 4 fits, 4 + 2 does not; the 3 and the 1 after it are not charged
    # either, although the 1 alone would fit (in order: the calls after a
    # refused one are not billed before it).
    recs = [_rec("k2", acct, 4, hold=4), _rec("k3", acct, 2, hold=2), _rec("k4", acct, 3, hold=3),
            _rec("k5", acct, 1, hold=1)]
    got = red.lease(acct, LID, 3, charge=10, busy=0, records=recs)
    assert got == [1, 1, 1, 0, 1], got
    a = red.acct(acct)
    assert (a["spent"], a["held"], a["leasefree"]) == (29, 71, 1), a
    assert a["credited"] - a["spent"] - a["held"] + a["leasefree"] >= 0
    mine = [(r["rid"], r["amount"]) for r in records(stack) if r["acct"] == str(acct)]
    assert mine == [("k1", "25"), ("k2", "4")], mine
    assert len(entries(stack)) == before + 2
    assert red.backlog() == backlog + 2
    # The lease stays (the worker may still have records to settle) ...
    assert _lease_value(red, acct)["amount"] == 1
    # ... and a resend of that op (its reply lost) answers the same count,
    # changing nothing.
    assert red.lease(acct, LID, 3, charge=10, busy=0, records=recs) == [2, 1, 1, 0, 1]
    assert red.acct(acct) == a and len(entries(stack)) == before + 2
    # A later op that fits is charged whole, as usual.
    assert red.lease(acct, LID, 4, charge=1, busy=0,
                     records=[_rec("k6", acct, 1)])[::4] == [1, 1]
    # No record fits at all: none charged, none appended, no entry.
    n = len(entries(stack))
    got = red.lease(acct, LID, 5, charge=3, busy=0, records=[_rec("k7", acct, 3, hold=3)])
    assert got[0] == 1 and got[4] == 0, got
    assert len(entries(stack)) == n and red.acct(acct)["spent"] == 30
    assert red.backlog() == backlog + 3


def test_an_emptied_lease_is_not_dropped_by_a_probe(stack):
    """The sweeper empties a silent lease (soft deadline); the worker's next
    op, a probe with nothing promised, must not drop it: records of calls it
    promised before it fenced itself follow, and take their points again."""
    red = redis_for(stack)
    acct = 900013
    red.credit(acct, 1, 100000)
    red.lease(acct, LID, 1, resize=200)
    _soft_deadline_passed(red, acct)
    assert red.settle(acct, LID, 0, "expire", 0)[0] == 1
    assert _lease_value(red, acct)["amount"] == 0
    assert red.lease(acct, LID, 2)[:2] == [1, 0]
    assert _lease_value(red, acct) is not None
    assert red.lease(acct, LID, 3, charge=30, busy=0,
                     records=[_rec(f"n{i}", acct, 1) for i in range(30)])[:2] == [1, 0]
    a = red.acct(acct)
    assert (a["spent"], a["held"], a["leasefree"]) == (30, 0, 0), a


def test_a_batch_reclaims_a_lease_once(stack):
    """The same lease twice in one expire batch (settle.lua): its free
    points go back once."""
    red = redis_for(stack)
    acct = 900014
    red.credit(acct, 1, 1000)
    red.lease(acct, LID, 1, resize=100)
    _soft_deadline_passed(red, acct)
    out = red.call(*red.settle_batch_cmd([(acct, LID, 0, "expire", 0)] * 2))
    assert out[0] == 1 and out[3] == 0, out
    a = red.acct(acct)
    assert (a["held"], a["leasefree"]) == (0, 0), a


def test_late_ops_of_a_lease_swept_whole(stack):
    """A gateway that stopped with lease ops it could not deliver replays
    them at its next start with close="late". The sweeper released the
    lease whole past its deadline and left its last seq as the swept mark:
    each late op above it charges its records from the available points, in
    order, as far as they go, once (the mark moves to its seq), and never
    recreates the lease. With the lease still there, a late op is a normal
    op (seq dedup)."""
    red = redis_for(stack)
    acct = next(_ACCOUNTS)
    red.credit(acct, 1, 1000)
    red.lease(acct, LID, 1, resize=40)
    red.lease(acct, LID, 2, charge=2, busy=5, records=[_rec("s1", acct, 1), _rec("s2", acct, 1)],
              ttl_ms=1)
    time.sleep(0.01)
    assert red.settle(acct, LID, 0, "expire", 0)[0] == 1
    assert _lease_value(red, acct) is None
    mark = swept_key(acct, LID)
    assert red.call("GET", mark) == "2"
    ttl = red.call("TTL", mark)
    assert 6 * 86400 < ttl <= 7 * 86400, ttl
    a = red.acct(acct)
    assert (a["spent"], a["held"], a["leasefree"]) == (2, 0, 0), a
    n, backlog = len(entries(stack)), red.backlog()
    # The op that was in flight (seq 3) and the records not yet sent (seq 4).
    got = red.lease(acct, LID, 3, charge=3, busy=0, close="late",
                    records=[_rec(f"s{i}", acct, 1) for i in range(3, 6)])
    assert got == [1, 0, 995, 0, 3], got
    assert red.call("GET", mark) == "3" and red.call("TTL", mark) > 6 * 86400
    assert _lease_value(red, acct) is None
    assert red.acct(acct)["spent"] == 5 and red.backlog() == backlog + 3
    # Replayed again (the gateway died before removing its spill file), or an
    # older op: nothing.
    for seq in (3, 2):
        got = red.lease(acct, LID, seq, charge=3, busy=0, close="late",
                        records=[_rec(f"s{i}", acct, 1) for i in range(3, 6)])
        assert got[0] == 0 and got[4] == 0, (seq, got)
    assert red.acct(acct)["spent"] == 5 and len(entries(stack)) == n + 1
    # Short of points: 2 available; records 1, 2, 1: the first only.
    assert red.reserve(acct, "big", 993)[0] == 1
    got = red.lease(acct, LID, 4, charge=4, busy=0, close="late",
                    records=[_rec("s6", acct, 1), _rec("s7", acct, 2, hold=2), _rec("s8", acct, 1)])
    assert got == [1, 0, 1, 0, 1], got
    a = red.acct(acct)
    assert (a["spent"], a["held"]) == (6, 993) and a["credited"] - a["spent"] - a["held"] == 1, a
    assert red.call("GET", mark) == "4"
    mine = [r["rid"] for r in records(stack) if r["acct"] == str(acct)]
    assert mine == ["s1", "s2", "s3", "s4", "s5", "s6"], mine
    assert red.backlog() == backlog + 4
    # The closing op that follows the replayed ones: the lease is gone.
    assert red.lease(acct, LID, 5, close=True)[0] == 0
    assert red.call("HEXISTS", holds_key(acct), LID) == 0
    # No mark (never swept, or the mark's 7 days passed): nothing, and a
    # late op never creates a lease, not even with seq 1.
    other = "L" + "77" * 16
    assert red.lease(acct, other, 2, charge=1, close="late", records=[_rec("t1", acct, 1)])[0] == 0
    assert red.lease(acct, other, 1, resize=10, close="late")[0] == 0
    assert red.call("HEXISTS", holds_key(acct), other) == 0
    assert red.acct(acct)["spent"] == 6


def test_a_late_op_of_a_live_lease_is_a_normal_op(stack):
    red = redis_for(stack)
    acct = next(_ACCOUNTS)
    red.credit(acct, 1, 1000)
    assert red.lease(acct, LID, 1, resize=40)[:2] == [1, 40]
    got = red.lease(acct, LID, 2, charge=2, busy=0, close="late",
                    records=[_rec("u1", acct, 1), _rec("u2", acct, 1)])
    assert got == [1, 38, 998, 0, 2], got
    # Applied already (the gateway delivered it before it stopped): seq dedup.
    got = red.lease(acct, LID, 2, charge=2, busy=0, close="late",
                    records=[_rec("u1", acct, 1), _rec("u2", acct, 1)])
    assert got == [2, 38, 998, 0, 2], got
    assert red.acct(acct)["spent"] == 2
    assert [r["rid"] for r in records(stack) if r["acct"] == str(acct)] == ["u1", "u2"]


def test_backlog_counts_the_records_each_script_appends(stack):
    """pg:backlog grows by the records of every entry settle.lua and
    lease.lua append, in the same step, and by nothing for an op that
    appends nothing."""
    red = redis_for(stack)
    acct = next(_ACCOUNTS)
    red.credit(acct, 1, 1000)
    b0 = red.backlog()
    for i in range(3):
        assert red.reserve(acct, f"bl{i}", 2)[0] == 1
    red.call(*red.settle_batch_cmd([(acct, f"bl{i}", 2, "commit", 200) for i in range(3)] +
                                   [(acct, "bl-none", 1, "commit", 200)]))
    assert red.backlog() == b0 + 3
    red.call(*red.settle_batch_cmd([(acct, "bl0", 2, "commit", 200)]))  # a no-op
    assert red.backlog() == b0 + 3
    red.lease(acct, LID, 1, resize=50)
    assert red.backlog() == b0 + 3
    red.lease(acct, LID, 2, charge=5, records=[_rec(f"bm{i}", acct, 1) for i in range(5)])
    assert red.backlog() == b0 + 8
    red.lease(acct, LID, 2, charge=5, records=[_rec(f"bm{i}", acct, 1) for i in range(5)])  # resend
    assert red.backlog() == b0 + 8
    assert red.backlog() - b0 == len([r for r in records(stack) if r["rid"].startswith("b")
                                      and r["acct"] == str(acct)])


def _outbox_bytes_per_record(red, n_records, write):
    """MEMORY USAGE of a fresh pg:outbox after WRITE appended N_RECORDS."""
    red.call("DEL", OUTBOX)
    write()
    got = sum(len(f) // 2 - 1 for _, f in [(e[0], e[1]) for e in red.call("XRANGE", OUTBOX, "-", "+")])
    assert got == n_records, (got, n_records)
    return red.call("MEMORY", "USAGE", OUTBOX, "SAMPLES", "0") / n_records


def test_outbox_memory_per_record(stack):
    """Redis memory per outbox record (README: how to size
    OUTBOX_MAX_BACKLOG against maxmemory), for the entries the gateway
    writes: per-call settles one per entry (light traffic) and batched (a
    loop pass's worth), and lease ops carrying many records. Records as the
    gateway makes them: 32-hex reservation ids, a 7-digit account."""
    red = redis_for(stack)
    acct = next(_ACCOUNTS)
    red.credit(acct, 1, 10**12)
    seq = iter(range(10**9))

    def rid():
        return "%032x" % (0x19c3a5b7d0000000000000000000000 + next(seq))

    def settles(n, per_entry):
        def write():
            for i in range(0, n, per_entry):
                ops = [(acct, rid(), 5, 600000, "device.read") for _ in range(per_entry)]
                red.pipeline([red.reserve_batch_cmd(ops)])
                red.pipeline([red.settle_batch_cmd([(o[0], o[1], 5, "commit", 200) for o in ops])])
        return write

    def lease_ops(n, per_op):
        lid = "L" + "%032x" % next(seq)

        def write():
            red.lease(acct, lid, 1, resize=10**9)
            for k in range(n // per_op):
                recs = [_rec(rid(), acct, 1, hold=1) for _ in range(per_op)]
                assert red.lease(acct, lid, k + 2, charge=per_op, records=recs)[0] == 1
        return write

    sizes = {
        "settle, 1 per entry": _outbox_bytes_per_record(red, 20000, settles(20000, 1)),
        "settle, 16 per entry": _outbox_bytes_per_record(red, 20000, settles(20000, 16)),
        "settle, 128 per entry": _outbox_bytes_per_record(red, 20480, settles(20480, 128)),
        "lease op, 23 records": _outbox_bytes_per_record(red, 23000, lease_ops(23000, 23)),
        "lease op, 128 records": _outbox_bytes_per_record(red, 25600, lease_ops(25600, 128)),
    }
    red.call("DEL", OUTBOX)
    print("outbox bytes per record: " + ", ".join(f"{k}: {v:.0f}" for k, v in sizes.items()))
    # For the rest of maxmemory: an account's hash, a key's mirror, a swept mark.
    red.call("SET", "pg:key:" + "ab" * 32, str(acct))
    mark = swept_key(acct, rid())
    red.call("SET", mark, "5|device.read", "EX", 604800)
    print("bytes: account hash %d, key mirror %d, swept mark %d" % (
        red.call("MEMORY", "USAGE", acct_key(acct)), red.call("MEMORY", "USAGE", "pg:key:" + "ab" * 32),
        red.call("MEMORY", "USAGE", mark)))
    # The README's sizing rests on these: at most ~200 bytes a record in the
    # worst case (one record per entry), well under 100 batched.
    assert sizes["settle, 1 per entry"] < 250, sizes
    assert all(v < 120 for k, v in sizes.items() if "1 per" not in k), sizes
