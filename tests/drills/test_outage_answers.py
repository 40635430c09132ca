"""What the API answers while Postgres or S3 is cut (FaultProxy), in-process and fast: a 503 with
Retry-After that changes nothing, and a result that is verified once the store is back. The full
drills with training runs are in test_drills.py."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))  # api_helpers; faultproxy: conftest.py

from api_helpers import ADMIN, assert_problem, create_job, make_settings, new_tenant, publish_adapter, running_job, uploaded_file  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from pg_databases import PG, fresh_pg_database, url_of  # noqa: E402

from service.main import create_app  # noqa: E402
from workers.storage import S3Store  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.s3]


@pytest.fixture(scope="module")
def cut_app(tmp_path_factory, s3_endpoint):
    """The API on Postgres and S3, each through a FaultProxy."""
    with fresh_pg_database("lf_outage") as name:
        yield from _cut_app(name, tmp_path_factory, s3_endpoint)


def _cut_app(name: str, tmp_path_factory, s3_endpoint):
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    S3Store(bucket, endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test").ensure_bucket()
    pg, s3 = FaultProxy(PG.port or 5432, PG.host or "127.0.0.1"), FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    settings = make_settings(tmp_path_factory.mktemp("outage"),
                             url_of(name, port=pg.port),
                             object_store_url=f"s3://{bucket}/lf", s3_endpoint_url=f"http://127.0.0.1:{s3.port}",
                             s3_access_key_id="test", s3_secret_access_key="test", db_connect_timeout_s=2)
    try:
        with TestClient(create_app(settings)) as client:
            yield client, pg, s3
    finally:
        pg.close()
        s3.close()


def _running_job(client):
    tenant = new_tenant(client)
    job_id, token = running_job(client, client.app, tenant)
    return tenant, job_id, {"Authorization": f"Bearer {token}"}


def test_database_cut_answers_503_with_retry_after_then_recovers(cut_app):
    client, pg, _ = cut_app
    tenant = new_tenant(client)
    file_id = uploaded_file(client, tenant)
    pg.cut()
    try:
        for response in (client.get("/v1/fine_tuning/jobs", headers=tenant.headers),  # a read
                         create_job(client, tenant, file_id),  # a write
                         client.get("/v1/admin/tenants", headers=ADMIN)):
            body = assert_problem(response, 503, "database_unavailable")
            assert response.headers["Retry-After"] == "2"
            assert "127.0.0.1" not in body["detail"] and "psycopg" not in response.text
    finally:
        pg.restore()
    assert client.get("/v1/fine_tuning/jobs", headers=tenant.headers).json()["data"] == []  # nothing written
    assert create_job(client, tenant, file_id).status_code == 201  # the first request after: served


def test_store_cut_during_verification_is_retryable_and_changes_nothing(cut_app):
    client, _, s3 = cut_app
    tenant, job_id, worker = _running_job(client)
    key = publish_adapter(client.app, job_id)
    s3.cut()
    try:
        r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key}, headers=worker)
    finally:
        s3.restore()
    assert_problem(r, 503, "storage_unavailable")
    assert r.headers["Retry-After"] == "2"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()["status"] == "running"
    r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key}, headers=worker)
    assert r.status_code == 200, r.text  # the worker's retry: verified and published
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == r.json()["adapter_id"]


def test_a_file_really_missing_still_fails_the_job(cut_app):
    client, _, _ = cut_app
    tenant, job_id, worker = _running_job(client)
    key = publish_adapter(client.app, job_id)
    client.app.state.store.delete(key.rsplit("/", 1)[0] + "/adapter_model.safetensors")
    r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key}, headers=worker)
    assert_problem(r, 422, "storage_error", "manifest_key")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and "missing" in job["error"]["message"]
