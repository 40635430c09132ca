"""Who can reach what: the chart's NetworkPolicies, evaluated against the pods it renders; the
serving signing key's audience; the public Ingress without /v1/admin."""

from __future__ import annotations

import pytest
import kubernetes_validate

from chart_helpers import EXAMPLES, FULLNAME, NAMESPACE, example_values, one, pods, render

K8S_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]
SIGNING_SECRET = f"{FULLNAME}-serve-signing"
PG = {"networkPolicy": {"postgres": {"podSelector": {"app.kubernetes.io/name": "postgresql"}}}}
VALUE_SETS = {"defaults": {}, "in-cluster-postgres": PG} | {p.stem: example_values(p) for p in EXAMPLES}


# -- a small NetworkPolicy evaluator (matchLabels, namespaceSelector, ports: what the chart uses) ---


def _matches(selector: dict | None, labels: dict) -> bool:
    assert not (selector or {}).get("matchExpressions"), "evaluator handles matchLabels only"
    return all(labels.get(k) == v for k, v in ((selector or {}).get("matchLabels") or {}).items())


def _peer_allows(peer: dict, policy_ns: str, src: dict) -> bool:
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src["ns"]}):
            return False
    elif src["ns"] != policy_ns:
        return False
    return "podSelector" not in peer or _matches(peer["podSelector"], src["labels"])


def can_reach(objs: list[dict], src: dict, dst: dict, port: int) -> bool:
    """Kubernetes semantics: a pod no Ingress policy selects takes anything; a selected pod takes
    what at least one rule of one selecting policy allows."""
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"
                and o["metadata"].get("namespace", NAMESPACE) == dst["ns"]
                and _matches(o["spec"]["podSelector"], dst["labels"])
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True
    for policy in policies:
        ns = policy["metadata"].get("namespace", NAMESPACE)
        for rule in policy["spec"].get("ingress", []):
            peers_ok = "from" not in rule or any(_peer_allows(p, ns, src) for p in rule["from"])
            ports_ok = "ports" not in rule or any(p.get("port") == port for p in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


def _pod_labels(objs: list[dict]) -> dict[str, dict]:
    """owner → {labels, ns} for every pod template the chart renders."""
    out = {}
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            out[o["metadata"]["name"].removeprefix(FULLNAME + "-")] = o["spec"]["template"]["metadata"]["labels"]
        elif o["kind"] in ("RayCluster", "RayService"):
            spec = o["spec"] if o["kind"] == "RayCluster" else o["spec"]["rayClusterConfig"]
            role = o["metadata"]["name"].removeprefix(FULLNAME + "-")
            out[f"{role}-head"] = spec["headGroupSpec"]["template"]["metadata"]["labels"]
            for g in spec.get("workerGroupSpecs", []):
                out[f"{role}-{g['groupName']}"] = g["template"]["metadata"]["labels"]
    return {k: {"labels": v, "ns": NAMESPACE} for k, v in out.items()}


STRANGER = {"labels": {"app": "some-other-app"}, "ns": NAMESPACE}
ELSEWHERE = {"labels": {"app": "some-other-app"}, "ns": "other"}
OPERATOR = {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "ns": "kuberay-system"}
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "agent": 52365}


# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policies_render_and_validate(name):
    policies = [o for o in render(VALUE_SETS[name]) if o["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies} >= {f"{FULLNAME}-ray-serve", f"{FULLNAME}-ray-train"}
    for obj in policies:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_serving_is_reached_only_by_the_api_and_its_own_cluster(name):
    objs = render(VALUE_SETS[name])
    pod = _pod_labels(objs)
    serving = [v for k, v in pod.items() if k.startswith("serving-")]
    training = [v for k, v in pod.items() if k.startswith("train-")]
    assert len(serving) >= 2 and len(training) >= 2
    for dst in serving:
        assert can_reach(objs, pod["api"], dst, 8000)
        for port in RAY_PORTS.values():
            assert not can_reach(objs, pod["api"], dst, port), port  # Serve's HTTP port only
        for src in (pod["scheduler"], pod["migrations"], *training, STRANGER, ELSEWHERE):
            assert not can_reach(objs, src, dst, 8000), src
            assert not can_reach(objs, src, dst, RAY_PORTS["gcs"]), src
        for src in serving:
            assert can_reach(objs, src, dst, 8000) and can_reach(objs, src, dst, RAY_PORTS["gcs"])
        assert can_reach(objs, OPERATOR, dst, 8265) and can_reach(objs, OPERATOR, dst, 8000)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_training_ray_head_is_reached_by_the_scheduler_and_ray_pods_only(name):
    objs = render(VALUE_SETS[name])
    pod = _pod_labels(objs)
    head = pod["train-head"]
    assert can_reach(objs, pod["scheduler"], head, RAY_PORTS["dashboard"])  # submits the runs
    for port in RAY_PORTS.values():
        assert can_reach(objs, pod["train-gpu"] if "train-gpu" in pod else head, head, port)
        # The API never calls Ray; serving's cluster is another cluster; strangers are strangers.
        for src in (pod["api"], pod["migrations"], pod["serving-head"], STRANGER, ELSEWHERE):
            assert not can_reach(objs, src, head, port), (src, port)
    assert not can_reach(objs, pod["scheduler"], head, RAY_PORTS["gcs"])
    assert can_reach(objs, OPERATOR, head, RAY_PORTS["dashboard"])


def test_in_cluster_postgres_only_from_api_scheduler_and_migrations():
    db = {"labels": {"app.kubernetes.io/name": "postgresql"}, "ns": NAMESPACE}
    default = render()
    assert not any(o["metadata"]["name"] == f"{FULLNAME}-postgres" for o in default)  # external DB
    objs = render(PG)
    pod = _pod_labels(objs)
    for owner in ("api", "scheduler", "migrations"):
        assert can_reach(objs, pod[owner], db, 5432), owner
    for owner in (k for k in pod if k.startswith(("serving-", "train-"))):
        assert not can_reach(objs, pod[owner], db, 5432), owner
    assert not can_reach(objs, STRANGER, db, 5432)

    # PostgreSQL in its own namespace: the policy lives there and names the release's namespace.
    objs = render({"networkPolicy": {"postgres": {"podSelector": {"app": "pg"}, "namespace": "databases",
                                                  "port": 6432}}})
    pod, db = _pod_labels(objs), {"labels": {"app": "pg"}, "ns": "databases"}
    assert one(objs, "NetworkPolicy", f"{FULLNAME}-postgres")["metadata"]["namespace"] == "databases"
    assert can_reach(objs, pod["api"], db, 6432) and not can_reach(objs, pod["api"], db, 5432)
    assert not can_reach(objs, {**STRANGER, "ns": "databases"}, db, 6432)
    assert not can_reach(objs, {**pod["api"], "ns": "another-release-ns"}, db, 6432)


def test_policies_can_be_turned_off_or_extended():
    assert not [o for o in render({"networkPolicy": {"enabled": False}}) if o["kind"] == "NetworkPolicy"]
    scraper = {"labels": {"app": "prometheus"}, "ns": "monitoring"}
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app": "prometheus"}}}
    objs = render({"networkPolicy": {"serve": {"extraFrom": [peer]}, "rayHead": {"extraFrom": [peer]}}})
    pod = _pod_labels(objs)
    assert can_reach(objs, scraper, pod["serving-head"], 8080)
    assert can_reach(objs, scraper, pod["train-head"], 8080)
    assert not can_reach(objs, STRANGER, pod["serving-head"], 8080)


# -- the signing key: API and serving pods only ------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_signing_key_reaches_the_api_and_serving_pods_only(name):
    values = VALUE_SETS[name]
    objs = render(values)
    secret = (values.get("serve", {}).get("signing", {}).get("existingSecret")) or SIGNING_SECRET
    readers = {p.owner for p in pods(objs) if secret in {s for s, _ in p.secret_refs()}}
    serving_pods = {p.owner for p in pods(objs) if p.owner.startswith("RayService/")}
    assert readers == {f"Deployment/{FULLNAME}-api"} | serving_pods
    for p in pods(objs):
        if p.owner in readers:
            env = p.env()
            current = env["LORAFLEET_SERVE_SIGNING_KEY"]["valueFrom"]["secretKeyRef"]
            previous = env["LORAFLEET_SERVE_SIGNING_KEY_PREVIOUS"]["valueFrom"]["secretKeyRef"]
            assert (current["name"], current["key"], previous["key"]) == (secret, "current", "previous")
            assert previous["optional"] is True  # only during a rotation
        else:
            assert not any("SIGNING" in name for name in p.env()), p.owner
    # Never on a command line or in the Serve config (both visible to anyone who can list them).
    service = one(objs, "RayService")
    assert "SIGNING" not in service["spec"]["serveConfigV2"].upper()


def test_signing_secret_generated_given_or_rotating():
    import base64

    def data(values):
        return {k: base64.b64decode(v).decode() for k, v in one(render(values), "Secret", SIGNING_SECRET)["data"].items()}

    generated = data({})
    assert set(generated) == {"current"} and len(generated["current"]) == 48
    assert data({"serve": {"signing": {"key": "k-new", "previousKey": "k-old"}}}) == {"current": "k-new",
                                                                                      "previous": "k-old"}
    objs = render({"serve": {"signing": {"existingSecret": "mine"}}})
    assert not [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == SIGNING_SECRET]
    assert not [o for o in render({"serve": {"enabled": False}}) if o["metadata"]["name"] == SIGNING_SECRET]


# -- the public Ingress ------------------------------------------------------------------------------


def _ingress_prefixes(values: dict) -> list[str]:
    ing = one(render({"api": {"ingress": {"enabled": True, **values}}}), "Ingress")
    return [p["path"] for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]]


def _api_paths() -> set[str]:
    from service.api.routes import admin, files, health, inference, internal, jobs, models

    return {r.path for m in (admin, files, health, inference, internal, jobs, models) for r in m.router.routes}


def _covered(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def test_ingress_exposes_every_tenant_route_and_not_admin_by_default():
    prefixes = _ingress_prefixes({})
    paths = _api_paths()
    tenant_routes = {p for p in paths if p.startswith("/v1/") and not p.startswith("/v1/admin")}
    assert tenant_routes and all(_covered(p, prefixes) for p in tenant_routes), (tenant_routes, prefixes)
    for hidden in (p for p in paths if not p.startswith("/v1/") or p.startswith("/v1/admin")):
        assert not _covered(hidden, prefixes), hidden  # admin, internal, health, metrics
    assert any(p.startswith("/v1/admin") for p in paths)

    with_admin = _ingress_prefixes({"exposeAdmin": True})
    assert all(_covered(p, with_admin) for p in paths if p.startswith("/v1/"))
    assert not any(_covered(p, with_admin) for p in paths if p.startswith("/internal/"))
