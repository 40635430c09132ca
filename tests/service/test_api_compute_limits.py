"""Compute limits at create: a job that could never run is a 422 insufficient_resources naming the
limit, and nothing is written. Tenant limits are the admin's to set and lift."""

from __future__ import annotations

from api_helpers import ADMIN, assert_problem, create_job, new_tenant, uploaded_file


def _jobs(client, tenant) -> int:
    return len(client.get("/v1/fine_tuning/jobs", headers=tenant.headers).json()["data"])


def test_job_beyond_the_cluster_maximum_is_refused_at_create(client, app, tenant, monkeypatch):
    monkeypatch.setattr(app.state.settings, "cluster_max_gpus", 8.0)
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, resources={"num_workers": 4, "gpus_per_worker": 4})
    body = assert_problem(r, 422, "insufficient_resources", "resources")
    assert "16 GPUs" in body["detail"] and "LORAFLEET_CLUSTER_MAX_GPUS" in body["detail"] and "8" in body["detail"]
    assert _jobs(client, tenant) == 0
    r = create_job(client, tenant, file_id, resources={"num_workers": 2, "gpus_per_worker": 4})
    assert r.status_code == 201, r.text


def test_tenant_limits_set_enforced_and_lifted_by_the_admin(client):
    tenant = new_tenant(client, max_gpus_per_job=2, max_job_wall_clock_s=3600)
    got = client.get(f"/v1/admin/tenants/{tenant.id}", headers=ADMIN).json()
    assert (got["max_gpus_per_job"], got["max_job_wall_clock_s"], got["max_concurrent_gpus"]) == (2, 3600, None)
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, resources={"num_workers": 1, "gpus_per_worker": 4})
    assert "max_gpus_per_job" in assert_problem(r, 422, "insufficient_resources", "resources")["detail"]

    r = client.patch(f"/v1/admin/tenants/{tenant.id}", headers=ADMIN,
                     json={"max_gpus_per_job": None, "max_concurrent_gpus": 3})
    assert r.status_code == 200 and r.json()["max_gpus_per_job"] is None and r.json()["max_concurrent_gpus"] == 3
    r = create_job(client, tenant, file_id, resources={"num_workers": 2, "gpus_per_worker": 2})
    assert "max_concurrent_gpus" in assert_problem(r, 422, "insufficient_resources", "resources")["detail"]
    assert create_job(client, tenant, file_id, resources={"num_workers": 1, "gpus_per_worker": 3}).status_code == 201


def test_limit_fields_are_bounded(client):
    for body in ({"max_gpus_per_job": -1}, {"max_job_wall_clock_s": 5}, {"max_concurrent_cpus": "4"}):
        r = client.post("/v1/admin/tenants", headers=ADMIN, json={"name": "x", **body})
        assert_problem(r, 422, "validation_error", next(iter(body)))


def test_resources_have_absolute_bounds(client, tenant):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, resources={"num_workers": 64, "gpus_per_worker": 8})
    assert_problem(r, 422, "validation_error", "resources.num_workers")
