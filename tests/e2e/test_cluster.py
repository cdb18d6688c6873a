"""Redis Cluster (issue 14), first part: the test stack's real cluster (3
masters, 3 replicas on loopback: scripts/stack.sh cluster-start) and the
routing facts both planes will use (common/cluster.c): slots as the cluster
computes them, the live slot map, MOVED to the map's owner, and the map
after a failover. Until the hot path routes by slot (docs/SCALING.md), both
programs refuse a redis+cluster:// URL at start instead of treating a seed
as a single Redis.
"""
import os
import subprocess
import time

import harness


def _slots_owner(stack, port):
    """{slot range start: master port} from one node's CLUSTER NODES
    (lines "id host:port@bus flags master ping pong epoch state ranges...")."""
    owners = {}
    for line in stack.cluster_cli(port, "CLUSTER", "NODES").splitlines():
        f = line.split()
        if len(f) < 8 or "master" not in f[2].split(",") or "fail" in f[2]:
            continue
        mport = int(f[1].split("@")[0].rsplit(":", 1)[1])
        for r in f[8:]:
            if not r.startswith("["):
                owners[int(r.split("-")[0])] = mport
    return owners


def test_cluster_routing_facts(stack):
    url = stack.start_cluster()
    assert len(stack.cluster_ports) == 6
    for port in stack.cluster_ports:
        assert "cluster_state:ok" in stack.cluster_cli(port, "CLUSTER", "INFO")
    # test_cluster's live part: the map parses and covers every slot,
    # CLUSTER KEYSLOT agrees on 3,000 keys, MOVED names the map's owner.
    p = subprocess.run([stack.bin("test_cluster")], env=dict(stack.env, CLUSTER_URL=url),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    # The gateway's ACL user may read the map and nothing it should not.
    gw_pw = stack.gateway_cluster_url.split(":")[2].split("@")[0]
    env = dict(os.environ, REDISCLI_AUTH=gw_pw)
    base = ["redis-cli", "-p", str(stack.cluster_ports[0]), "--no-auth-warning", "--user",
            "pointgate-gateway", "--raw"]
    ok = subprocess.run(base + ["CLUSTER", "SLOTS"], capture_output=True, text=True, env=env)
    assert ok.stdout.strip() and "NOPERM" not in ok.stdout, ok.stdout
    denied = subprocess.run(base + ["CLUSTER", "FAILOVER"], capture_output=True, text=True,
                            env=env)
    assert "NOPERM" in denied.stdout + denied.stderr, denied.stdout


def test_failover_moves_the_map(stack):
    """kill -9 of a master: its replica is promoted within a few seconds
    and the map every node gives names the new master, which the live
    check then routes by."""
    url = stack.start_cluster()
    victim = stack.cluster_ports[0]
    before = _slots_owner(stack, stack.cluster_ports[1])
    assert before[0] == victim, before
    pid = int(open(os.path.join(stack.dir, "cluster", str(victim), "redis.pid")).read())
    os.kill(pid, 9)
    deadline = time.time() + 30
    after = before
    while time.time() < deadline:
        after = _slots_owner(stack, stack.cluster_ports[1])
        if after.get(0) not in (None, victim):
            break
        time.sleep(0.2)
    assert after.get(0) not in (None, victim), after
    assert after[0] in stack.cluster_ports[3:], after  # a replica took over
    # Seeds: the dead one first; the live check must still find the map.
    p = subprocess.run([stack.bin("test_cluster")],
                       env=dict(stack.env, CLUSTER_URL=url.replace(
                           f"127.0.0.1:{victim},", "") + f",127.0.0.1:{victim}"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_cluster_url_refused_until_served(stack):
    url = stack.start_cluster()
    env = dict(stack.env, REDIS_URL=stack.gateway_cluster_url,
               GATEWAY_LISTEN=f"127.0.0.1:{harness.free_port()}", UPSTREAM_URL="http://127.0.0.1:1",
               ROUTES_FILE=stack.write_routes({"routes": [{"id": "r", "method": "GET",
                                                            "path": "/a", "price": 1}]}))
    p = subprocess.run([stack.bin("gateway")], env=env, capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and "redis+cluster" in p.stderr, p.stderr
    assert stack.redis_password not in p.stderr
    p = stack.run_billing("status", env={"REDIS_URL": url}, check=False)
    assert p.returncode != 0 and "redis+cluster" in p.stderr, p.stderr
    assert stack.redis_password not in p.stderr
