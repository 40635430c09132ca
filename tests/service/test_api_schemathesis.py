"""Property-based fuzzing over /openapi.json (schemathesis): no input makes the API answer 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from api_helpers import ADMIN, create_job, new_tenant, uploaded_file
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.db.models import Job
from service.jobs import states
from service.main import create_app
from service.security import job_token


@pytest.fixture(scope="module")
def callers(client):
    """Credentials for the three kinds of route, and a running job for the internal ones."""
    tenant = new_tenant(client)
    job_id = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    with client.app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.RUNNING)
        s.commit()
    return {"tenant": tenant.headers, "job_id": job_id,
            "job": {"Authorization": f"Bearer {job_token(job_id, 0, client.app.state.settings, ttl_s=3600)}"}}


def _headers(path: str, callers: dict) -> dict[str, str]:
    if path.startswith("/internal/"):
        return callers["job"]
    return ADMIN if path.startswith("/v1/admin/") else callers["tenant"]


def test_no_server_errors(api_settings, serve_url, callers):
    """Every operation, 20 generated requests each (derandomized: the same run every time)."""
    app = create_app(api_settings.model_copy(update={"serve_url": serve_url}))
    with TestClient(app):  # runs start-up
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        _fuzz(schema, callers)


def _fuzz(schema, callers: dict) -> None:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if case.path.startswith("/internal/"):  # a real job, so handlers run past auth
                case.path_parameters = {**(case.path_parameters or {}), "job_id": callers["job_id"]}
            # Only the 5xx check: the finer conformance points are asserted by the other tests.
            case.call_and_validate(headers=_headers(case.path, callers), checks=[not_a_server_error])

        fuzz()
