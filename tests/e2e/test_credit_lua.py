"""billing/credit.lua on real Redis, op by op: what it does when it has to
create an account's hash (Redis lost it) while the account still has holds,
and the spent catch-up after a rebuild (issue 10, items 4 and 9).

No billing runs here: the scripts are called directly (luahelp.py loads the
repository's scripts), with credit.lua's four keys as billing/hot.c passes
them (outbox, acct hash, holds hash, rebuilt marker).
"""
from luahelp import OUTBOX, RedisError, acct_key, holds_key, redis_for

LID = "L" + "cd" * 16


def _rebuilt_key(a):
    return f"pg:{{{a}}}:rebuilt"


def _credit(red, acct, seq, credited, spent=0, guard="", drop_guards="0"):
    """credit.lua as billing/hot.c calls it: {applied, seq, spent repaired}."""
    return red.call("EVALSHA", red.sha("credit"), 4, OUTBOX, acct_key(acct), holds_key(acct),
                    _rebuilt_key(acct), seq, credited, spent, guard, drop_guards)


def test_recreated_hash_keeps_the_points_held(stack):
    """The account hash alone is lost while calls hold points (two per-call
    holds and a lease): the push that recreates it takes held and leasefree
    from the holds hash, so no reserve can spend what the holds have."""
    red = redis_for(stack)
    a = 910001
    got = _credit(red, a, 1, 100)
    assert got == [1, 1, 0], got
    assert red.reserve(a, "h1", 30)[0] == 1
    assert red.reserve(a, "h2", 20)[0] == 1
    st, amount = red.lease(a, LID, 1, resize=10)[:2]
    assert st == 1 and amount == 10
    before = red.acct(a)
    assert before["held"] == 60 and before["leasefree"] == 10, before
    red.call("DEL", acct_key(a))  # lost (or evicted) alone; the holds hash survives
    assert _credit(red, a, 1, 100) == [1, 1, 0]
    after = red.acct(a)
    assert after == {"credited": 100, "seq": 1, "spent": 0, "held": 60, "leasefree": 10}, after
    # 40 available (the lease's 10 free are its worker's to promise first).
    assert red.reserve(a, "big", 41)[0] == 0
    assert red.reserve(a, "fits", 40)[0] == 1
    # The old holds settle against the recreated figures: no overdraft, all adds up.
    assert red.settle(a, "h1", 30)[:2] == [1, 30]
    assert red.settle(a, "h2", 0, "release", 503)[:2] == [1, 0]
    assert red.settle(a, "fits", 0, "release", 503)[:2] == [1, 0]
    assert red.lease(a, LID, 2, resize=-10, close=True)[0] == 1
    got = red.acct(a)
    assert got["held"] == 0 and got["spent"] == 30 and got.get("leasefree", 0) == 0, got
    # Created from Postgres for an account with credits: the rebuilt marker.
    assert 0 < int(red.call("PTTL", _rebuilt_key(a))) <= 300000


def test_partial_hash_left_by_a_settle_is_recreated_with_the_holds(stack):
    """A settle of a surviving hold on a lost account writes only held and
    spent (a partial hash, no seq): the next push replaces it with figures
    that count the holds still open, never held = 0 or negative."""
    red = redis_for(stack)
    a = 910002
    assert _credit(red, a, 1, 100) == [1, 1, 0]
    assert red.reserve(a, "p1", 10)[0] == 1
    assert red.reserve(a, "p2", 15)[0] == 1
    red.call("DEL", acct_key(a))
    assert red.settle(a, "p1", 10)[:2] == [1, 10]
    partial = red.acct(a)
    assert "seq" not in partial and partial["held"] == -10, partial
    assert _credit(red, a, 1, 100, spent=0) == [1, 1, 0]
    got = red.acct(a)
    assert got["held"] == 15 and got["credited"] == 100, got
    assert red.settle(a, "p2", 15)[:2] == [1, 15]
    assert red.acct(a)["held"] == 0


def test_guard_hold_survives_recreation(stack):
    """A negative adjustment's guard (route _adjustment) counts as held in
    the recreated hash, and the push that carries the adjustment drops it."""
    red = redis_for(stack)
    a = 910003
    assert _credit(red, a, 1, 100) == [1, 1, 0]
    assert red.reserve(a, "adj-g", 40, 30000, "_adjustment")[0] == 1
    red.call("DEL", acct_key(a))
    assert _credit(red, a, 1, 100) == [1, 1, 0]
    assert red.acct(a)["held"] == 40
    assert red.reserve(a, "spend", 61)[0] == 0  # the guarded 40 stay out of reach
    assert _credit(red, a, 2, 60, guard="adj-g") == [1, 2, 0]
    got = red.acct(a)
    assert got["held"] == 0 and got["credited"] == 60, got


def test_unusable_hold_refuses_recreation_and_writes_nothing(stack):
    red = redis_for(stack)
    a = 910004
    red.call("HSET", holds_key(a), "bad", "x|device.read|1")
    try:
        _credit(red, a, 1, 100)
        raise AssertionError("credit.lua accepted an unusable hold")
    except RedisError as e:
        assert "unusable hold" in str(e), e
    assert red.call("EXISTS", acct_key(a)) == 0
    assert red.call("EXISTS", _rebuilt_key(a)) == 0


def test_spent_catches_up_after_a_rebuild_even_under_traffic(stack):
    """After a rebuild, a settlement batch read before the loss may commit
    after the rebuild read Postgres spent: while the rebuilt marker lives,
    every push raises spent to Postgres', with calls in flight and the
    outbox busy. Without the marker (an account hash that was never lost,
    or created for an account without credits) the old rule holds: only
    with nothing in flight."""
    red = redis_for(stack)
    a = 910005
    assert _credit(red, a, 3, 100, spent=20) == [1, 3, 0]  # the rebuild
    assert red.call("EXISTS", _rebuilt_key(a)) == 1
    assert red.reserve(a, "busy", 5)[0] == 1  # a call in flight
    red.call("XADD", OUTBOX, "*", "ts", 1, "c", f"x|{a}|r|1|1|commit|200")
    assert _credit(red, a, 3, 100, spent=50) == [0, 3, 1]  # the late batch's 30
    assert red.acct(a)["spent"] == 50
    assert _credit(red, a, 3, 100, spent=40) == [0, 3, 0]  # never lowered
    assert red.acct(a)["spent"] == 50
    red.call("DEL", _rebuilt_key(a))
    assert _credit(red, a, 3, 100, spent=60) == [0, 3, 0]  # busy: no raise now
    assert red.acct(a)["spent"] == 50
    # An account made at creation (seq 0) gets no marker: nothing was lost.
    b = 910006
    assert _credit(red, b, 0, 0) == [1, 0, 0]
    assert red.call("EXISTS", _rebuilt_key(b)) == 0
    assert red.acct(b) == {"credited": 0, "seq": 0, "spent": 0, "held": 0}


def _pass_credit(red, acct, marker, seq, credited, spent=0):
    """credit.lua as a repair pass calls it (billing/hot.c hot_pass_credit):
    the pass's marker as KEYS[5]."""
    return red.call("EVALSHA", red.sha("credit"), 5, OUTBOX, acct_key(acct), holds_key(acct),
                    _rebuilt_key(acct), marker, seq, credited, spent, "", "1")


def test_pass_whose_marker_is_gone_writes_no_account(stack):
    """A pass read its figures from Postgres, then Redis lost its data (the
    pass's marker went with it): its pushes write nothing, so no account
    hash is made from figures older than the loss (spent lower than what
    settlement committed since: calls could spend it again; credited lower
    than a top-up since: funded calls refused). Before, the pass looked for
    its marker only every 256 accounts, and wrote the ones in between."""
    red = redis_for(stack)
    a, b = 910201, 910202
    gone, live = "pg:rebuild:gone-910201", "pg:rebuild:live-910201"
    red.call("DEL", gone)
    assert _pass_credit(red, a, gone, 3, 100, 40) == [0, 0, 0, 1]
    assert red.call("EXISTS", acct_key(a)) == 0
    assert red.call("EXISTS", _rebuilt_key(a)) == 0
    # An existing hash is left as it is too.
    assert _credit(red, b, 1, 50) == [1, 1, 0]
    assert _pass_credit(red, b, gone, 2, 80, 10) == [0, 0, 0, 1]
    assert red.acct(b) == {"credited": 50, "seq": 1, "spent": 0, "held": 0}, red.acct(b)
    # With its marker in place the pass writes as before.
    red.call("SET", live, "1", "EX", 60)
    assert _pass_credit(red, a, live, 3, 100, 40) == [1, 3, 0]
    assert red.acct(a) == {"credited": 100, "seq": 3, "spent": 40, "held": 0}, red.acct(a)
    assert _pass_credit(red, b, live, 2, 80, 10)[:2] == [1, 2]
    assert red.acct(b)["credited"] == 80
