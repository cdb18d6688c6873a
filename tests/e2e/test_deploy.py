"""deploy/ against the code (issue 11, items 6 and 7): the Kubernetes
manifests, docker-compose.yml, the Grafana dashboard and the Prometheus
rules, parsed with the real formats' parsers (python3-yaml, json) and checked
against what the programs actually read and serve.

What "against the code" means here, since a manifest can be valid YAML and
still wrong:
- every environment variable a manifest or the compose file sets is one its
  program reads: the set is built from the C sources (every getenv/env_*
  call with a literal name) of the program's own directory plus the shared
  modules both binaries link for it (common/*.c), never from a list kept
  here;
- probe paths are paths the program's ops listener compares against, and
  probe ports are the port of its *_OPS_LISTEN in the same manifest; the
  deployed routes.json is loaded by a real gateway, whose /readyz and
  /healthz then answer 200;
- no credential is written in a manifest: variables whose names say secret
  (TOKEN, PASSWORD, PEPPER, SECRET) or that carry credentials in a URL
  (DATABASE_URL, REDIS_URL) come from secretKeyRef, and no literal value
  looks like user:password@; the Secret template is not applied;
- preStop + the stop delay + the drain bound fit in the grace period, with
  the defaults taken from gateway/config.c and billing/config.c when a
  manifest does not set them.
`kubectl kustomize`, `docker compose config` and a JSON-schema check of
every object (deploy/k8s/validate.mjs, npm's kubernetes-models) run when
those tools are installed (skipped otherwise: none is a dependency of the
build yet).
"""
import glob
import json
import os
import re
import shutil
import subprocess

import yaml

import harness
from harness import ROOT, http

K8S = os.path.join(ROOT, "deploy", "k8s")
PROM = os.path.join(ROOT, "deploy", "prometheus")
GRAFANA = os.path.join(ROOT, "deploy", "grafana")
SECRET_TEMPLATE = "secret.example.yaml"
ENV_CALL = re.compile(r'\b(?:getenv|env_[a-z0-9_]+)\(\s*"([A-Z][A-Z0-9_]*)"')
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PEPPER|SECRET|DSN")
CREDENTIAL_URL_NAMES = {"DATABASE_URL", "REDIS_URL"}
CREDENTIAL_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]+@")
SHARED = ["common/*.c"]
PROGRAM_SOURCES = {
    "gateway": ["gateway/*.c"] + SHARED,
    "billing": ["billing/*.c"] + SHARED,
    "devsim": ["tests/sim/*.c"] + SHARED,
}
OPS_VAR = {"gateway": "GATEWAY_OPS_LISTEN", "billing": "BILLING_OPS_LISTEN"}


def _sources(program):
    text = ""
    for pattern in PROGRAM_SOURCES[program]:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path) as f:
                text += f.read()
    return text


def _env_read(program):
    return set(ENV_CALL.findall(_sources(program)))


def _int_default(program, name):
    """The default of an env_int64 variable, from the program's config."""
    m = re.search(r'env_int64\(\s*"%s",\s*(\d+)' % name, _sources(program))
    assert m, f"{program} reads no integer {name}"
    return int(m.group(1))


def _docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kustomization():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        return yaml.safe_load(f)


def _objects():
    """Every object the kustomization applies: [(file, object)]."""
    out = []
    for res in _kustomization()["resources"]:
        for d in _docs(os.path.join(K8S, res)):
            out.append((res, d))
    return out


def _by_kind(kind):
    return [d for _, d in _objects() if d["kind"] == kind]


def _deployment(name):
    (d,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == name]
    return d


def _program(container):
    """Which binary a container runs: its command's first word, or the one
    a `sh -c "... exec billing serve"` ends with."""
    cmd = container.get("command") or []
    words = " ".join(cmd).replace("&&", " ").split()
    for w in reversed(words):
        if os.path.basename(w) in PROGRAM_SOURCES:
            return os.path.basename(w)
    raise AssertionError(f"no known program in {cmd}")


def _containers(dep):
    spec = dep["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


def _port_of(hostport):
    return int(hostport.rsplit(":", 1)[1])


# ---- Kubernetes ------------------------------------------------------------

def test_k8s_every_manifest_parses_and_is_listed(stack):
    kust = _kustomization()
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    for gen in kust.get("configMapGenerator", []):
        for f in gen["files"]:
            listed.add(f.split("=", 1)[-1])
    for f in listed:
        assert os.path.isfile(os.path.join(K8S, f)), f"kustomization lists a missing {f}"
    yamls = {os.path.basename(p) for p in glob.glob(os.path.join(K8S, "*.yaml"))}
    # Everything but the kustomization itself and the Secret template is applied.
    assert yamls - listed == {"kustomization.yaml", SECRET_TEMPLATE}, yamls - listed
    assert SECRET_TEMPLATE not in listed
    kinds = {}
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        for d in _docs(path):
            assert {"apiVersion", "kind"} <= set(d), path
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], path
            kinds.setdefault(d["kind"], []).append(d.get("metadata", {}).get("name"))
    for kind in ("Namespace", "Deployment", "Service", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "NetworkPolicy", "PersistentVolumeClaim", "Secret"):
        assert kind in kinds, f"no {kind}"
    assert set(kinds["Deployment"]) == {"pointgate-gateway", "pointgate-billing"}


def test_k8s_kustomize_renders(stack):
    """The real renderer, when installed: the routes ConfigMap gets its
    content hash and the gateway's volume follows it (that is how a routes
    change becomes a rollout)."""
    if not shutil.which("kubectl"):
        print("    skipped: no kubectl")
        return
    p = subprocess.run(["kubectl", "kustomize", K8S], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    objs = [d for d in yaml.safe_load_all(p.stdout) if d]
    cms = [d for d in objs if d["kind"] == "ConfigMap"]
    assert len(cms) == 1 and re.fullmatch(r"pointgate-routes-[a-z0-9]{10}",
                                          cms[0]["metadata"]["name"]), cms
    with open(os.path.join(K8S, "routes.json")) as f:
        assert cms[0]["data"]["routes.json"] == f.read()
    (gw,) = [d for d in objs if d["kind"] == "Deployment" and
             d["metadata"]["name"] == "pointgate-gateway"]
    vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    assert vols["routes"]["configMap"]["name"] == cms[0]["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == "pointgate" for d in objs
               if d["kind"] != "Namespace"), "every object in the pointgate namespace"
    assert not [d for d in objs if d["kind"] == "Secret"], "no Secret is applied"


def _models_dir():
    """kubernetes-models (npm) if installed: KUBERNETES_MODELS, else the
    global npm root's copy."""
    d = os.environ.get("KUBERNETES_MODELS")
    if not d and shutil.which("npm"):
        p = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=60)
        d = os.path.join(p.stdout.strip(), "kubernetes-models")
    return d if d and os.path.isdir(d) else None


def test_k8s_schema_valid(stack):
    """Every object (the Secret template too) against Kubernetes' JSON
    schemas, with deploy/k8s/validate.mjs and the npm package
    kubernetes-models, when node and the package are installed."""
    models = _models_dir()
    if not shutil.which("node") or not models:
        print("    skipped: no node or no kubernetes-models (npm install -g kubernetes-models@5.1.0)")
        return
    objs = [d for _, d in _objects()] + _docs(os.path.join(K8S, SECRET_TEMPLATE))
    p = subprocess.run(["node", os.path.join(K8S, "validate.mjs"), models], input=json.dumps(objs),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("ok ") == len(objs), p.stdout
    # The validator is not a rubber stamp.
    broken = json.loads(json.dumps(_by_kind("HorizontalPodAutoscaler")))
    broken[0]["spec"]["minReplicas"] = "two"
    p = subprocess.run(["node", os.path.join(K8S, "validate.mjs"), models],
                       input=json.dumps(broken), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "minReplicas" in p.stdout, p.stdout + p.stderr


def test_k8s_env_vars_are_read_by_the_programs(stack):
    for dep in _by_kind("Deployment"):
        for c in _containers(dep):
            prog = _program(c)
            read = _env_read(prog)
            assert len(read) > 5, f"found too few variables in {prog}'s sources: {read}"
            for name in _env(c):
                assert name in read, f"{dep['metadata']['name']}/{c['name']}: {prog} never reads {name}"
                assert "_TEST_" not in name, f"a test-only variable in a manifest: {name}"
    # The operator tokens are billing's alone.
    for c in _containers(_deployment("pointgate-gateway")):
        assert not {"ADMIN_TOKEN", "FINANCE_TOKEN"} & set(_env(c))


def test_k8s_no_secret_inline(stack):
    templates = {d["metadata"]["name"]: d for d in _docs(os.path.join(K8S, SECRET_TEMPLATE))}
    for dep in _by_kind("Deployment"):
        for c in _containers(dep):
            for name, e in _env(c).items():
                where = f"{dep['metadata']['name']}/{c['name']} {name}"
                if SECRET_NAME.search(name) or name in CREDENTIAL_URL_NAMES:
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in e, f"{where}: must come from a secretKeyRef"
                    # The reference resolves in the template, which documents it.
                    assert ref["name"] in templates, f"{where}: no Secret {ref['name']} template"
                    assert ref["key"] in templates[ref["name"]]["stringData"], where
                if "value" in e:
                    assert not CREDENTIAL_IN_URL.search(str(e["value"])), f"{where}: credentials"
    # The template holds placeholders only, never a usable value.
    for name, d in templates.items():
        assert d["kind"] == "Secret"
        for k, v in d["stringData"].items():
            assert v.startswith("<") and v.endswith(">"), f"{name}.{k} is not a placeholder"
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        assert "secretGenerator" not in yaml.safe_load(f)


def test_k8s_probes_match_the_code(stack):
    for dep in _by_kind("Deployment"):
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        prog = _program(c)
        src = _sources(prog)
        env = _env(c)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        ops_port = _port_of(env[OPS_VAR[prog]]["value"])
        assert env[OPS_VAR[prog]]["value"].startswith("0.0.0.0:"), "the kubelet probes the pod IP"
        for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            probe = c[kind]["httpGet"]
            assert probe["path"] == path, (prog, kind, probe)
            assert f'strcmp(url, "{path}")' in src or f'strcmp(path, "{path}")' in src, \
                f"{prog}'s ops listener does not serve {path}"
            port = ports.get(probe["port"], probe["port"])
            assert port == ops_port, f"{prog} {kind} probes {port}, ops listens on {ops_port}"
        if "startupProbe" in c:
            assert ports.get(c["startupProbe"]["httpGet"]["port"]) == ops_port
        # The public/admin listener is the other named port.
        listen = {"gateway": "GATEWAY_LISTEN", "billing": "BILLING_LISTEN"}[prog]
        assert _port_of(env[listen]["value"]) in ports.values()
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_k8s_stop_fits_the_grace_period(stack):
    """Kubernetes counts terminationGracePeriodSeconds from the preStop
    hook: preStop, then SIGTERM (readiness 503, still serving for the stop
    delay), then the drain bound must all fit before the SIGKILL."""
    for name, prog, drain in (("pointgate-gateway", "gateway", "GATEWAY_DRAIN_TIMEOUT_MS"),
                              ("pointgate-billing", "billing", None)):
        dep = _deployment(name)
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        env = _env(c)
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep", sleep
        pre_s = float(sleep[1])
        delay_var = f"{prog.upper()}_STOP_DELAY_MS"
        delay_ms = int(env[delay_var]["value"]) if delay_var in env else _int_default(prog, delay_var)
        drain_ms = 10000  # billing: a settlement batch in flight (no bound of its own)
        if drain:
            drain_ms = int(env[drain]["value"]) if drain in env else _int_default(prog, drain)
        need = pre_s + delay_ms / 1000 + drain_ms / 1000
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= need + 5, f"{name}: grace {grace}s < {need}s of stop + 5 s margin"
        # The preStop sleep is the time the endpoint removal needs; the stop
        # delay repeats it for load balancers probing /readyz themselves.
        assert pre_s * 1000 == delay_ms, f"{name}: preStop {pre_s}s vs {delay_var}={delay_ms}"


def test_k8s_selectors_and_references(stack):
    deps = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deps.items()}

    def selects(selector):
        return [n for n, labels in pod_labels.items()
                if all(labels.get(k) == v for k, v in selector.items())]

    for n, d in deps.items():
        assert selects(d["spec"]["selector"]["matchLabels"]) == [n]
    pod_ports = {n: {p["name"]: p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])} for n, d in deps.items()}
    for svc in _by_kind("Service"):
        (target,) = selects(svc["spec"]["selector"])
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "nothing exposed by a Service"
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in pod_ports[target], (svc["metadata"]["name"], p)
    for pdb in _by_kind("PodDisruptionBudget"):
        assert len(selects(pdb["spec"]["selector"]["matchLabels"])) == 1
    for hpa in _by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deps
        (m,) = hpa["spec"]["metrics"]
        assert m["type"] == "Resource" and m["resource"]["name"] == "cpu"
        for c in deps[ref["name"]]["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"]["cpu"], "CPU utilisation needs a request"
        assert hpa["spec"]["minReplicas"] >= 2, "the PDB needs a second pod"
    # Volumes: the routes ConfigMap is the generator's, the PVC exists, and
    # the mounted routes file is the one ROUTES_FILE names.
    gen = {g["name"] for g in _kustomization()["configMapGenerator"]}
    pvcs = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    gw = deps["pointgate-gateway"]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in gw["volumes"]}
    assert vols["routes"]["configMap"]["name"] in gen
    assert vols["spill"]["persistentVolumeClaim"]["claimName"] in pvcs
    (c,) = gw["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    env = _env(c)
    assert env["ROUTES_FILE"]["value"] == mounts["routes"] + "/routes.json"
    assert env["GATEWAY_SPILL_DIR"]["value"] == mounts["spill"]
    # The gateway's worker threads fit its CPU limit.
    assert int(env["GATEWAY_THREADS"]["value"]) <= int(str(c["resources"]["limits"]["cpu"]))


def test_k8s_networkpolicy_keeps_admin_and_ops_inside(stack):
    deps = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    policies = {d["metadata"]["name"]: d for d in _by_kind("NetworkPolicy")}
    for name, inside in (("pointgate-gateway", {"ops"}), ("pointgate-billing", {"ops", "admin"})):
        labels = deps[name]["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in policies.values()
                    if all(labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())]
        assert covering, f"no NetworkPolicy selects {name}"
        (c,) = deps[name]["spec"]["template"]["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        opened = set()
        for pol in covering:
            assert "Ingress" in pol["spec"]["policyTypes"]
            for rule in pol["spec"].get("ingress", []):
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports, f"{pol['metadata']['name']}: a rule for every port opens too much"
                for p in ports:
                    assert p in named, f"{pol['metadata']['name']}: unknown port {p}"
                opened |= ports
                if ports & inside:
                    peers = rule.get("from")
                    assert peers, f"{name}: {ports & inside} open to any source"
                    for peer in peers:
                        assert "ipBlock" not in peer, f"{name}: {ports & inside} open to an ipBlock"
                        assert set(peer) <= {"podSelector", "namespaceSelector"}
        assert inside <= opened, f"{name}: {inside - opened} unreachable (Prometheus?)"


def test_k8s_routes_load_in_a_real_gateway(stack):
    """The deployed routes.json is one the gateway accepts: it starts on it
    and its probes (the manifest's paths) answer 200."""
    if stack.devsim is None:
        stack.start_devsim()
        stack.start_billing()
    with open(os.path.join(K8S, "routes.json")) as f:
        routes = json.load(f)
    gw = stack.start_gateway(routes=routes)
    c = _deployment("pointgate-gateway")["spec"]["template"]["spec"]["containers"][0]
    for kind in ("readinessProbe", "livenessProbe"):
        path = c[kind]["httpGet"]["path"]
        stack.wait_for(lambda: http("GET", gw.ops_url + path).status == 200, timeout=15,
                       what=f"gateway {path} 200 on the deployed routes")
    b = _deployment("pointgate-billing")["spec"]["template"]["spec"]["containers"][0]
    for kind in ("readinessProbe", "livenessProbe"):
        path = b[kind]["httpGet"]["path"]
        stack.wait_for(lambda: http("GET", stack.billing.ops_url + path).status == 200,
                       timeout=15, what=f"billing {path} 200")
    # A priced route of the deployed file bills.
    acct, key = stack.new_account_in_redis(points=10)
    r = http("GET", gw.url + "/v1/devices/d1", headers=harness.auth(key))
    assert r.status == 200 and r.headers.get("x-points-charged") == "1", r
    gw.stop()


# ---- docker compose ----------------------------------------------------------

def _compose():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def test_compose_config_valid(stack):
    """`docker compose config` when the compose plugin is installed; the
    file's own references otherwise (and in any case)."""
    compose = _compose()
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        p = subprocess.run([docker, "compose", "-f", os.path.join(ROOT, "docker-compose.yml"),
                            "config", "-q"], capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
        assert p.returncode == 0, p.stderr
    else:
        print("    docker compose not installed: checked by parsing only")
    services = compose["services"]
    for name, svc in services.items():
        for dep in (svc.get("depends_on") or {}):
            assert dep in services, f"{name} depends on a missing {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert os.path.exists(os.path.join(ROOT, src)), f"{name} mounts a missing {src}"
            else:
                assert src in compose["volumes"], f"{name}: undeclared volume {src}"
    # The provisioned files are where Grafana and Prometheus look for them.
    for f in ("prometheus/prometheus.yml", "prometheus/alerts.yml",
              "grafana/provisioning/datasources/prometheus.yml",
              "grafana/provisioning/dashboards/pointgate.yml", "grafana/dashboards/pointgate.json"):
        assert os.path.isfile(os.path.join(ROOT, "deploy", f)), f


def test_compose_env_vars_are_read_by_the_programs(stack):
    for name, svc in _compose()["services"].items():
        if svc.get("image") != "pointgate:latest":
            continue
        prog = _program({"command": svc["command"]})
        read = _env_read(prog)
        for var in svc.get("environment", {}):
            assert var in read, f"compose {name}: {prog} never reads {var}"
        if prog == "gateway":
            assert not {"ADMIN_TOKEN", "FINANCE_TOKEN"} & set(svc["environment"])
        if prog in OPS_VAR:
            ops = _port_of(svc["environment"][OPS_VAR[prog]])
            assert f"127.0.0.1:{ops}/healthz" in " ".join(svc["healthcheck"]["test"])
            published = {str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])}
            assert str(ops) not in published, f"compose {name}: the ops port is published"


# ---- Grafana and Prometheus files ---------------------------------------------

def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_grafana_dashboard_and_provisioning(stack):
    with open(os.path.join(GRAFANA, "dashboards", "pointgate.json")) as f:
        dash = json.load(f)
    with open(os.path.join(GRAFANA, "provisioning", "datasources", "prometheus.yml")) as f:
        ds = yaml.safe_load(f)
    with open(os.path.join(GRAFANA, "provisioning", "dashboards", "pointgate.yml")) as f:
        prov = yaml.safe_load(f)
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"]
    assert prov["providers"][0]["type"] == "file"
    assert dash["uid"] and dash["title"]
    n = 0
    ids = set()
    for p in _panels(dash["panels"]):
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        n += 1
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: empty expr"
            uid = (t.get("datasource") or p.get("datasource") or {}).get("uid")
            assert uid == source["uid"], f"panel {p['title']!r}: datasource {uid}"
    assert n >= 20, n
    # What the issue asks the dashboard to show, by the metric behind each.
    exprs = " ".join(t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []))
    for metric in ("pointgate_gateway_requests_total", "pointgate_gateway_request_duration_seconds",
                   "pointgate_gateway_points_charged_total", "pointgate_billing_outbox_oldest_age_seconds",
                   "pointgate_billing_outbox_backlog_records", "pointgate_billing_postgres_up",
                   "pointgate_gateway_redis_up", "pointgate_gateway_leases",
                   "pointgate_gateway_waiting_calls"):
        assert metric in exprs, f"the dashboard does not show {metric}"


def test_alert_rules_parse_and_have_runbooks(stack):
    with open(os.path.join(PROM, "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    # GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes.
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    alerts = []
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["expr"].strip()
            if "alert" in r:
                alerts.append(r["alert"])
                assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
                runbook = r["annotations"]["runbook"]
                assert runbook.startswith("README.md#"), runbook
                assert runbook.split("#", 1)[1] in anchors, f"{r['alert']}: no README section {runbook}"
    assert len(alerts) == len(set(alerts)) and len(alerts) >= 8
    with open(os.path.join(PROM, "prometheus.yml")) as f:
        conf = yaml.safe_load(f)
    assert conf["rule_files"] == ["alerts.yml"]
    assert {j["job_name"] for j in conf["scrape_configs"]} == {"pointgate-gateway", "pointgate-billing"}
    # The compose targets are the ops listeners.
    env = {n: s.get("environment", {}) for n, s in _compose()["services"].items()}
    for j in conf["scrape_configs"]:
        (target,) = j["static_configs"][0]["targets"]
        host, port = target.split(":")
        prog = host
        assert _port_of(env[host][OPS_VAR[prog]]) == int(port), target
