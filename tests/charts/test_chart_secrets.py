"""Each pod holds exactly the secrets its work needs, and none appears in clear.

Per pod kind, what it needs and why:
  API         database, object store (uploads, adapter files), admin token, internal secret
              (checks job tokens). Not the Ray token: it never calls Ray, only Serve's HTTP port.
  scheduler   database, internal secret (signs job tokens), Ray token (submits Ray Jobs).
              Not the object store's keys: it names the store in a spec, never reads it.
  migrations  database.
  Ray pods    the object store's keys (workers and replicas read it), by secretKeyRef; none
              with workload identity. The Ray token reaches them through KubeRay's authOptions.
The serving signing key (when the chart wires it) may reach the API and the serving Ray pods
only: it is recognised by the environment variable that carries it.
"""

from __future__ import annotations

import json

import pytest

from chart_helpers import EXAMPLES, FULLNAME, example_values, pods, render, values_error

DB_URL = "postgresql+psycopg://lf:db-pass-7f1e@pg:5432/lf"
SECRET_VALUES = {"AKIA-CHART-TEST", "s3-secret-9c8b", DB_URL, "admin-tok-5d4c", "internal-6b5a", "ray-tok-3e2f"}
INLINE = {
    "database": {"url": DB_URL},
    "objectStore": {"url": "s3://bucket/pre", "endpointUrl": "http://minio:9000",
                    "accessKeyId": "AKIA-CHART-TEST", "secretAccessKey": "s3-secret-9c8b"},
    "auth": {"adminToken": "admin-tok-5d4c", "internalSecret": "internal-6b5a"},
    "ray": {"auth": {"token": "ray-tok-3e2f"}},
}
EXISTING = {
    "database": {"existingSecret": "my-db", "existingSecretKey": "dsn"},
    "objectStore": {"url": "s3://bucket/pre", "existingSecret": "my-s3"},
    "auth": {"existingSecret": "my-auth"},
    "ray": {"auth": {"existingSecret": "my-ray"}},
}
WORKLOAD_IDENTITY = {"objectStore": {"url": "s3://bucket/pre",
                                     "workloadIdentity": {"enabled": True, "serviceAccountName": "lf-s3"}}}
CASES = {"inline": INLINE, "existing": EXISTING, "workload-identity": WORKLOAD_IDENTITY, "defaults": {}} | {
    p.stem: example_values(p) for p in EXAMPLES}
SIGNING_ENV = ("LORAFLEET_SERVE_SIGNING_KEY", "LORAFLEET_SERVE_SIGNING_KEY_PREVIOUS")


def _names(values: dict) -> dict[str, tuple[str, str] | None]:
    """(secret, key) of each credential for ``values``; None where there is none."""
    db, store = values.get("database", {}), values.get("objectStore", {})
    auth = values.get("auth", {}).get("existingSecret") or f"{FULLNAME}-auth"
    store_secret = store.get("existingSecret") or f"{FULLNAME}-object-store"
    keys = bool(store.get("existingSecret") or store.get("accessKeyId"))
    return {
        "database": (f"{FULLNAME}-database", "url") if db.get("url") else (
            db.get("existingSecret", "lorafleet-database"), db.get("existingSecretKey", "url")),
        "s3_id": (store_secret, "access-key-id") if keys else None,
        "s3_key": (store_secret, "secret-access-key") if keys else None,
        "admin": (auth, "admin-token"),
        "internal": (auth, "internal-secret"),
        "ray": (values.get("ray", {}).get("auth", {}).get("existingSecret") or f"{FULLNAME}-ray-token", "auth_token"),
    }


def _kind(owner: str) -> str:
    if owner.startswith("RayCluster/"):
        return "ray-train"
    if owner.startswith("RayService/"):
        return "ray-serve"
    return owner.rsplit("-", 1)[1]  # Deployment/lf-lorafleet-api → api


NEEDS = {
    "api": ("database", "s3_id", "s3_key", "admin", "internal"),
    "scheduler": ("database", "internal", "ray"),
    "migrations": ("database",),
    "ray-train": ("s3_id", "s3_key"),
    "ray-serve": ("s3_id", "s3_key"),
}
MAY_SIGN = {"api", "ray-serve"}


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_each_pod_holds_exactly_the_secrets_its_work_needs(values):
    objs = render(values)
    names = _names(values)
    seen = set()
    for p in pods(objs):
        kind = _kind(p.owner)
        seen.add(kind)
        signing = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                   for n, e in p.env().items() if n in SIGNING_ENV and "valueFrom" in e}
        assert not signing or kind in MAY_SIGN, f"{p.owner} holds the serving signing key"
        expected = {names[need] for need in NEEDS[kind]} - {None}
        assert p.secret_refs() - signing == expected, p.owner
    assert seen == set(NEEDS), seen


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_the_database_url_and_control_plane_secrets_stay_in_the_control_plane(values):
    for p in pods(render(values)):
        env = set(p.env())
        if _kind(p.owner).startswith("ray-"):
            assert not {n for n in env if "DATABASE" in n or "POSTGRES" in n}, p.owner
            assert not {"LORAFLEET_ADMIN_TOKEN", "LORAFLEET_INTERNAL_SECRET", "RAY_AUTH_TOKEN"} & env, p.owner
        if _kind(p.owner) == "api":
            assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "LORAFLEET_RAY_ADDRESS"} & env
            assert "LORAFLEET_SERVE_URL" in env  # it still proxies to Serve


def test_no_secret_value_appears_in_clear_outside_its_secret():
    objs = render(INLINE)
    for o in objs:
        if o["kind"] == "Secret":
            continue
        text = json.dumps(o)
        assert not [v for v in SECRET_VALUES if v in text], f"{o['kind']}/{o['metadata']['name']}"
    # The Ray pods get the object store's keys by reference, under the names boto3 reads.
    for p in (p for p in pods(objs) if p.ray):
        env = p.env()
        for name, key in (("AWS_ACCESS_KEY_ID", "access-key-id"), ("AWS_SECRET_ACCESS_KEY", "secret-access-key")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-object-store", "key": key}, p.owner


def test_workload_identity_puts_no_key_anywhere_and_runs_store_readers_as_its_account():
    objs = render(WORKLOAD_IDENTITY)
    assert f"{FULLNAME}-object-store" not in {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    for p in pods(objs):
        env = p.env()
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LORAFLEET_S3_ACCESS_KEY_ID",
                    "LORAFLEET_S3_SECRET_ACCESS_KEY"} & set(env), p.owner
        reads_store = p.ray or _kind(p.owner) == "api"
        assert p.spec.get("serviceAccountName") == ("lf-s3" if reads_store else None), p.owner


def test_workload_identity_and_keys_together_are_refused():
    both = {"objectStore": {"url": "s3://bucket/pre", "accessKeyId": "a", "secretAccessKey": "b",
                            "workloadIdentity": {"enabled": True, "serviceAccountName": "lf-s3"}}}
    assert "workloadIdentity" in values_error(both)
