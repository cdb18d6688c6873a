"""Redis's own CPU per call on a cluster node against a single Redis
(scripts/bench-cluster.py [ROOT]; docs/SCALING.md). The real reserve.lua
and settle.lua, per-call holds, in the batches each layout allows:

  single      one Redis, a loop pass's 128 calls in one batch whatever their
              accounts (what the gateway does today)
  cluster     a cluster-enabled Redis that owns every slot, the same calls
              in one batch per account (a script may touch one slot only,
              and an account's keys carry its own tag {A})
  groups      the same node, accounts tagged by one of G slot groups
              ({gN}), one batch per group

each over ACCOUNTS accounts drawn at random per call (1,000, like make
bench's many-accounts) and over one account, alternated twice in the same
run. Redis's time is INFO commandstats' usec for EVALSHA plus the XADD-free
DEL of the outbox, divided by the calls. Prints microseconds per call and
the ratios to single."""
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import luahelp  # noqa: E402
from harness import free_port  # noqa: E402
from luahelp import Redis  # noqa: E402

ACCOUNTS = 1000
BATCH = 128
ROUNDS = 150
GROUPS = 48  # slot groups: 16 per master of a 3-master cluster


def start(cluster, d):
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", d]
    if cluster:
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-port", str(free_port())]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            r = Redis(port, password=None)
            r.call("PING")
            break
        except OSError:
            time.sleep(0.05)
    if cluster:
        r.call("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(200):
            info = r.call("CLUSTER", "INFO")
            info = info.decode() if isinstance(info, bytes) else info
            if "cluster_state:ok" in info:
                break
            time.sleep(0.05)
    return p, r


def tag(layout, a):
    return f"g{a % GROUPS}" if layout == "groups" else str(a)


def keys_of(layout, a):
    t = tag(layout, a)
    base = f"pg:{{{t}}}:" if layout != "groups" else f"pg:{{{t}}}:{a}:"
    return base + "acct", base + "holds", f"pg:{{{t}}}:outbox"


def check(replies, want):
    """Every op of every batch answered status WANT (a bench of errors
    would measure nothing)."""
    for r in replies:
        if not isinstance(r, list) or any(r[i] != want for i in range(0, len(r), 3)):
            raise SystemExit(f"bench-cluster: unexpected reply {str(r)[:200]}")


def run(red, layout, accounts):
    rs, ss = red.sha("reserve"), red.sha("settle")
    for a in range(1, accounts + 1):
        ak, hk, _ = keys_of(layout, a)
        red.call("HSET", ak, "credited", 10**15, "seq", 1, "spent", 0, "held", 0)
    red.call("CONFIG", "RESETSTAT")
    rng = random.Random(7)
    calls = 0
    for r in range(ROUNDS):
        ops = [(rng.randint(1, accounts), f"r{r}-{i}") for i in range(BATCH)]
        # One batch per slot the layout puts the calls in ("single": one).
        batches = {}
        for a, rid in ops:
            k = "all" if layout == "single" else tag(layout, a)
            batches.setdefault(k, []).append((a, rid))
        cmds = []
        for group in batches.values():
            keys, args = [], []
            for a, rid in group:
                ak, hk, _ = keys_of(layout, a)
                keys += [ak, hk]
                args += [rid, 1, 30000, "bench"]
            cmds.append(["EVALSHA", rs, len(keys), *keys, *args])
        check(red.pipeline(cmds), 1)
        cmds, outboxes = [], set()
        for group in batches.values():
            ob = "pg:outbox" if layout == "single" else keys_of(layout, group[0][0])[2]
            outboxes.add(ob)
            keys, args = [ob], []
            for a, rid in group:
                ak, hk, _ = keys_of(layout, a)
                keys += [ak, hk]
                args += [rid, 1, "commit", 200, a]
            cmds.append(["EVALSHA", ss, len(keys), *keys, *args])
        check(red.pipeline(cmds), 1)
        calls += len(ops)
        red.pipeline([["DEL", ob] for ob in outboxes])
    st = red.call("INFO", "commandstats")
    st = st.decode() if isinstance(st, bytes) else st
    usec = 0
    for line in st.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            usec += int(line.split("usec=")[1].split(",")[0])
    return usec / calls


def main():
    luahelp.ROOT = ROOT
    procs, dirs = [], []
    try:
        reds = {}
        for cluster in (False, True):
            d = tempfile.mkdtemp(prefix="bench-cluster-")
            dirs.append(d)
            p, r = start(cluster, d)
            procs.append(p)
            reds[cluster] = r
        res = {}
        for _ in range(2):
            for accounts in (ACCOUNTS, 1):
                for layout in ("single", "cluster", "groups"):
                    red = reds[layout != "single"]
                    us = run(red, layout, accounts)
                    key = (layout, accounts)
                    res[key] = min(us, res.get(key, us))
        for accounts in (ACCOUNTS, 1):
            base = res[("single", accounts)]
            print(f"{accounts} account(s), Redis us per call (reserve + settle), best of 2:")
            for layout in ("single", "cluster", "groups"):
                us = res[(layout, accounts)]
                print(f"  {layout:8s} {us:7.2f} us   {us / base:5.2f}x single")
    finally:
        for p in procs:
            p.kill()
        for d in dirs:
            subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
