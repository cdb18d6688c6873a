"""billing/lease.lua on real Redis, op by op: the contract the gateway's
lease.c relies on (creation and growth bounded by the available points,
records charged and appended in one step, a resent op applied once, give
back, contention), and the sweeper's side of it in settle.lua (a lease
expires only past its deadline, whole, at cost 0, with no outbox record).

The accounts here live in Redis only (credit.lua creates their hashes): no
billing runs in this module, so the outbox is read as the scripts left it.
"""
import time

from luahelp import OUTBOX, RedisError, acct_key, entries, holds_key, records, redis_for

LID = "L" + "ab" * 16


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
    assert got == [1, 100, 1000, 0], (got, red.acct(acct))
    a = red.acct(acct)
    assert a["held"] == 100 and a["leasefree"] == 100 and _shown(a) == 1000, a
    assert _lease_value(red, acct)["free"] == 100
    # Three calls ended (charges 1, 1, 0) while two more are promised (busy 2).
    recs = [_rec("r1", acct, 1), _rec("r2", acct, 1), _rec("r3", acct, 0, outcome="release",
                                                          status=503)]
    n_entries = len(entries(stack))
    assert red.lease(acct, LID, 2, charge=2, busy=2, records=recs) == [1, 98, 998 - 2, 0]
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
    st, amount, _, _ = red.lease(acct, LID, 3, resize=400, busy=2)
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
    assert red.lease(acct, LID, 2, **op) == [2, 47, first[2], 0]
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
    st, amount, _, contended = red.lease(acct, LID, 2, resize=50, busy=0)
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
    # An account that cannot make up the difference: refused, nothing
    # charged, the lease released (test_records_beyond_lease_...).
    red.credit(900010, 1, 20)
    red.lease(900010, LID, 1, resize=5)
    red.reserve(900010, "p1", 15)
    n = len(entries(stack))
    assert red.lease(900010, LID, 2, charge=6, busy=0,
                     records=[_rec(f"q{i}", 900010, 1) for i in range(6)])[0] == -2
    a = red.acct(900010)
    assert (a["spent"], a["held"], a["leasefree"]) == (0, 15, 0), a
    assert list(red.hash(holds_key(900010))) == ["p1"] and len(entries(stack)) == n


def test_a_call_the_account_cannot_afford_leaves_leases_be(stack):
    red = redis_for(stack)
    acct = 900011
    red.credit(acct, 1, 100)
    red.lease(acct, LID, 1, resize=25)
    assert red.reserve(acct, "big", 500) == [0, 75, 25]  # 75 + 25 < 500: refused
    assert "contend" not in red.acct(acct)
    assert red.lease(acct, LID, 2, resize=10)[3] == 0


def test_records_beyond_lease_and_available_drop_the_lease_whole(stack):
    """Records that charge more than the lease holds plus what the account
    has available (the sweeper emptied the lease while its worker was cut
    off, and others spent the rest): nothing is charged, and the lease goes
    back at once rather than stay held for a worker that drops it. Records
    the available points do cover are charged, and promises beyond them
    stay uncovered, not refused."""
    red = redis_for(stack)
    acct = 900012
    red.credit(acct, 1, 100)
    red.lease(acct, LID, 1, resize=20)  # a quarter of 100
    red.reserve(acct, "p1", 70)  # 10 left available
    before = len(entries(stack))
    # 25 charged with 5 promised against 20 held: 5 more from the 10
    # available for the records, the last 5 for the promises.
    assert red.lease(acct, LID, 2, charge=25, busy=5,
                     records=[_rec("k1", acct, 25, hold=25)])[:2] == [1, 5]
    a = red.acct(acct)
    assert (a["spent"], a["held"], a["leasefree"]) == (25, 75, 0), a
    assert a["credited"] - a["spent"] - a["held"] == 0
    # Then 10 charged against the 5 it holds, nothing available: refused,
    # nothing charged, the lease released whole.
    assert red.lease(acct, LID, 3, charge=10, busy=0,
                     records=[_rec("k2", acct, 10, hold=10)])[0] == -2
    a = red.acct(acct)
    assert (a["spent"], a["held"], a["leasefree"]) == (25, 70, 0), a
    assert _lease_value(red, acct) is None
    assert len(entries(stack)) == before + 1


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
