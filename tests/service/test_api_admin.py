"""Admin: tenants, quotas, API keys (hashed, shown once, revocable), base models."""

from __future__ import annotations

import hashlib

from api_helpers import ADMIN, assert_problem, new_tenant
from sqlalchemy import select

from service.db.models import ApiKey, IdempotencyKey


def test_tenant_crud_and_defaults(client):
    r = client.post("/v1/admin/tenants", json={"name": "acme", "max_queued_jobs": 3}, headers=ADMIN)
    assert r.status_code == 201
    t = r.json()
    assert t["id"].startswith("tn_") and t["status"] == "active"
    assert (t["max_queued_jobs"], t["max_concurrent_jobs"], t["requests_per_minute"]) == (3, 2, 10_000)
    assert client.get(f"/v1/admin/tenants/{t['id']}", headers=ADMIN).json() == t
    r = client.patch(f"/v1/admin/tenants/{t['id']}", json={"requests_per_minute": 5}, headers=ADMIN)
    assert r.json()["requests_per_minute"] == 5
    ids = [x["id"] for x in client.get("/v1/admin/tenants?limit=100", headers=ADMIN).json()["data"]]
    assert t["id"] in ids


def test_admin_routes_need_the_admin_token(client, tenant):
    assert_problem(client.get("/v1/admin/tenants"), 401, "unauthorized")
    assert_problem(client.get("/v1/admin/tenants", headers=tenant.headers), 403, "forbidden")
    assert_problem(client.post("/v1/admin/tenants", json={"name": "x", "bogus": 1}, headers=ADMIN),
                   422, "validation_error", "bogus")
    # Postgres cannot store NUL, SQLite can: both backends must refuse it alike.
    assert_problem(client.post("/v1/admin/tenants", json={"name": "a\x00b"}, headers=ADMIN),
                   422, "validation_error", "name")


def test_key_is_stored_hashed_shown_once_and_revocable(client, app):
    t = new_tenant(client)
    assert client.get("/v1/files", headers=t.headers).status_code == 200
    listed = client.get(f"/v1/admin/tenants/{t.id}/api_keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in listed] == [t.key_id]
    assert "key" not in listed[0] and t.key.startswith(listed[0]["prefix"])
    with app.state.session_factory() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.id == t.key_id)).one()
        assert row.key_hash == hashlib.sha256(t.key.encode()).hexdigest()
        assert t.key not in (row.key_hash, row.prefix)

    r = client.delete(f"/v1/admin/api_keys/{t.key_id}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert_problem(client.get("/v1/files", headers=t.headers), 401, "unauthorized")


def test_disabled_tenant_is_forbidden(client):
    t = new_tenant(client)
    client.patch(f"/v1/admin/tenants/{t.id}", json={"status": "disabled"}, headers=ADMIN)
    assert_problem(client.get("/v1/fine_tuning/jobs", headers=t.headers), 403, "forbidden")
    client.patch(f"/v1/admin/tenants/{t.id}", json={"status": "active"}, headers=ADMIN)
    assert client.get("/v1/fine_tuning/jobs", headers=t.headers).status_code == 200


def test_bad_or_missing_keys(client):
    assert_problem(client.get("/v1/files"), 401, "unauthorized")
    assert_problem(client.get("/v1/files", headers={"Authorization": "Bearer lf-nope"}), 401, "unauthorized")
    assert_problem(client.get("/v1/admin/tenants/tn_missing", headers=ADMIN), 404, "not_found")


def test_register_base_model(client):
    body = {"id": "acme/llama-mini", "source_uri": "s3://models/llama-mini", "architecture": "llama",
            "methods": ["lora"], "max_rank": 16}
    r = client.post("/v1/admin/models", json=body, headers=ADMIN)
    if r.status_code == 409:  # the session-wide database already has it from the other backend run
        r = client.get("/v1/admin/models", headers=ADMIN)
        assert any(m["id"] == "acme/llama-mini" for m in r.json()["data"])
    else:
        assert r.status_code == 201 and r.json()["methods"] == ["lora"]
    assert_problem(client.post("/v1/admin/models", json=body, headers=ADMIN), 409, "conflict", "id")
    ids = [m["id"] for m in client.get("/v1/admin/models", headers=ADMIN).json()["data"]]
    assert "lorafleet/tiny-llama" in ids and "acme/llama-mini" in ids
    bad = {**body, "id": "bad:id/"}
    assert_problem(client.post("/v1/admin/models", json=bad, headers=ADMIN), 422, "validation_error", "id")


def test_a_new_keys_secret_is_never_stored_for_idempotent_replay(client, app):
    tid = client.post("/v1/admin/tenants", json={"name": "secretive"}, headers=ADMIN).json()["id"]
    headers = {**ADMIN, "Idempotency-Key": "key-create-1"}
    r = client.post(f"/v1/admin/tenants/{tid}/api_keys", json={"name": "ci"}, headers=headers)
    assert r.status_code == 201 and r.json()["key"].startswith("lf-")
    with app.state.session_factory() as s:
        bodies = s.scalars(select(IdempotencyKey.body)).all()
    assert not any(r.json()["key"] in body for body in bodies)
