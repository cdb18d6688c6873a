"""The limits' cost inside Redis (scripts/bench-lua.py [ROOT]): Redis's own
time (INFO commandstats) per reserve+settle op of the real scripts, in
batches of 128 on one account, for an account under limits (a rate limit
and two caps that never refuse) and one without, alternated twice in the
same run on a private redis-server. Prints microseconds per op and the
ratio; the gateway's figures are make bench's."""
import os, subprocess, sys, time, socket
ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import luahelp
from luahelp import Redis, acct_key, holds_key
_s = socket.socket()
_s.bind(("127.0.0.1", 0))
port = _s.getsockname()[1]
_s.close()
import tempfile
d = tempfile.mkdtemp(prefix="bench-lua-")
p = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", d],
                     stdout=subprocess.DEVNULL)
time.sleep(0.5)
luahelp.ROOT = ROOT
red = Redis(port, password=None)
def run(limited, rounds=200):
    acct = 1 if limited else 2
    red.call("DEL", acct_key(acct), holds_key(acct), f"pg:{{{acct}}}:lim")
    red.call("HSET", acct_key(acct), "credited", 10**15, "seq", 1, "spent", 0, "held", 0)
    if limited:
        red.call("HSET", acct_key(acct), "limited", 1)
        red.call("HSET", f"pg:{{{acct}}}:lim", "seq", 1, "a.rq", 10**6, "a.rw", 1000, "a.cd", 10**12, "a.cm", 10**12)
    rs, ss = red.sha("reserve"), red.sha("settle")
    red.call("CONFIG", "RESETSTAT")
    n = 128
    for r in range(rounds):
        keys, args = [], []
        for i in range(n):
            keys += [acct_key(acct), holds_key(acct)]
            args += [f"r{r}-{i}", 1, 30000, "bench", 7, 10**6 if limited else 0, 1000 if limited else 0]
        red.call("EVALSHA", rs, 2 * n, *keys, *args)
        keys, args = ["pg:outbox"], []
        for i in range(n):
            keys += [acct_key(acct), holds_key(acct)]
            args += [f"r{r}-{i}", 1, "commit", 200, acct]
        red.call("EVALSHA", ss, 2 * n + 1, *keys, *args)
        red.call("DEL", "pg:outbox")
    st = red.call("INFO", "commandstats")
    st = st.decode() if isinstance(st, bytes) else st
    us = [l for l in st.splitlines() if l.startswith("cmdstat_evalsha")][0]
    tot = int(us.split("usec=")[1].split(",")[0])
    return tot / (rounds * n)
try:
    res = {False: [], True: []}
    for lim in (False, True, False, True):
        res[lim].append(run(lim))
        print("limited" if lim else "plain  ", f"{res[lim][-1]:.2f} us per reserve+settle op")
    print(f"limited / plain: {min(res[True]) / min(res[False]):.2f}x")
finally:
    p.kill()
    subprocess.run(["rm", "-rf", d])
