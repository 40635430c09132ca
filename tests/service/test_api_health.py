"""Health, readiness, metrics, error shape of the unexpected, and the no-torch import rule."""

from __future__ import annotations

import subprocess
import sys

from api_helpers import create_job, uploaded_file
from fastapi.testclient import TestClient

from service.main import create_app


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "object_store": "ok"}


def test_readyz_reports_an_unreachable_database(api_settings):
    settings = api_settings.model_copy(update={
        "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none", "auto_migrate": False})
    # Not entered as a context manager: start-up (which needs the database) is skipped.
    r = TestClient(create_app(settings)).get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"].startswith("error")
    assert r.json()["checks"]["object_store"] == "ok"


def test_metrics_count_routes_by_template_and_jobs_by_status(client, tenant):
    file_id = uploaded_file(client, tenant)
    job_id = create_job(client, tenant, file_id).json()["id"]
    client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers)
    text = client.get("/metrics").text
    assert 'lorafleet_http_requests_total{method="GET",route="/v1/fine_tuning/jobs/{job_id}",status="200"}' in text
    assert job_id not in text  # labels are route templates, never ids
    assert "lorafleet_http_request_duration_seconds_bucket" in text
    queued = [line for line in text.splitlines() if line.startswith('lorafleet_jobs{status="queued"}')]
    assert queued and float(queued[0].split()[-1]) >= 1


def test_unexpected_errors_are_a_500_problem_without_traceback(api_settings):
    app = create_app(api_settings)

    def boom():
        raise RuntimeError("secret internals")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "internal_error" and r.json()["request_id"] == r.headers["x-request-id"]
    assert "secret internals" not in r.text and "Traceback" not in r.text


def test_importing_the_service_does_not_import_torch():
    code = "import sys, service.main; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
