"""What the fuzz harnesses (tests/fuzz/) found, checked on the real stack.

fuzz_settle: settlement read the numbers of an outbox record with strtoll
alone, so " 5", "+5", "05" and "\\n2" passed as 5 and 2: two different
records read as one, and what Postgres kept was not what Redis held. A
record's numbers must now be canonical decimals, as settle.lua and lease.lua
write them (and as prelude.lua's int() reads them); any other record is a
malformed entry, moved whole to the dead-letter stream, and charges nothing,
while the good records around it settle.
"""
import time

from luahelp import OUTBOX, Redis, entries, outbox_add


def test_non_canonical_numbers_are_dead_lettered(stack):
    stack.start_billing()
    acct, _ = stack.new_account(points=100, name="fuzz-regress")
    red = Redis(stack.redis_port)
    ts = int(time.time() * 1000)
    bad = [
        ("lead-zero", "0%d" % acct, "device.read", 1, 1, "commit", 200),
        ("plus", "+%d" % acct, "device.read", 1, 1, "commit", 200),
        ("space", " %d" % acct, "device.read", 1, 1, "commit", 200),
        ("amount-05", acct, "device.read", "05", 5, "commit", 200),
        ("hold-minus-zero", acct, "device.read", 0, "-0", "release", 0),
        ("status-lf", acct, "device.read", 1, 1, "commit", "\n200"),
    ]
    try:
        red.call("DEL", "pg:outbox:dead")
        outbox_add(red, ts, ("good-1", acct, "device.read", 2, 2, "commit", 200))
        for rec in bad:
            outbox_add(red, ts, rec)  # one entry each: a malformed entry goes whole
        outbox_add(red, ts, ("good-2", acct, "device.read", 3, 3, "commit", 200))
    finally:
        red.close()
    stack.wait_for(lambda: len(entries(stack, OUTBOX)) == 0, timeout=60, what="outbox drained")
    rows = stack.psql(f"select reservation_id, amount from charges where account_id = {acct} "
                      "order by reservation_id")
    assert rows == [["good-1", "2"], ["good-2", "3"]], rows
    dead = entries(stack, "pg:outbox:dead")
    assert len(dead) == len(bad), dead
    assert all(f["why"] == "malformed" for _, f in dead), dead
    kept = sorted(f["c"].split("|")[0] for _, f in dead)
    assert kept == sorted(r[0] for r in bad), kept
