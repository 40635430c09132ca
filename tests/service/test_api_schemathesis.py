"""Property-based fuzzing over /openapi.json (schemathesis): the API answers as its document says.

Every built-in check is on: no 5xx, status codes, content types, response headers and response
bodies conform to the document, schema-valid data is accepted and invalid data rejected, auth is
enforced (``ignored_auth``: each operation is replayed without and with bad credentials),
missing headers and unsupported methods are refused, and deleted resources stay deleted
(``use_after_free``, ``ensure_resource_availability``). Schemathesis' own object-level check needs
a Web Fuzzing Commons identities file; the same property is checked here directly: whatever one
tenant could read, another tenant reading the same URL gets a 404 (``cross_tenant_read``).

Both generation modes run per operation, then a stateful run over the links schemathesis infers
(create a file → read it, list it, delete it; …). Derandomized, so every run is the same run;
the budget keeps the whole file well under a minute on this machine.
"""

from __future__ import annotations

import pytest
import schemathesis
from api_helpers import ADMIN, create_job, new_tenant, uploaded_file
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation

from service.db.models import Job
from service.jobs import states
from service.main import create_app
from service.security import job_token

EXAMPLES = 6  # per operation and generation mode
STATEFUL_STEPS = 30


@pytest.fixture(scope="module")
def fuzz_app(api_settings, serve_url):
    """An app of its own (its own failed-auth limiter: the auth probes send many bad keys)."""
    app = create_app(api_settings.model_copy(update={"serve_url": serve_url, "failed_auth_per_minute": 100_000}))
    with TestClient(app) as client:  # runs start-up
        yield client


@pytest.fixture(scope="module")
def callers(fuzz_app):
    """Credentials for the three kinds of route, a running job for the internal ones, and a
    second tenant for the cross-tenant reads."""
    client = fuzz_app
    tenant = new_tenant(client)
    job_id = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    with client.app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.RUNNING)
        s.commit()
    return {"tenant": tenant.headers, "job_id": job_id, "other": new_tenant(client).headers,
            "job": {"Authorization": f"Bearer {job_token(job_id, 0, client.app.state.settings, ttl_s=3600)}"}}


def _headers(path: str, callers: dict) -> dict[str, str]:
    if path.startswith("/internal/"):
        return callers["job"]
    return ADMIN if path.startswith("/v1/admin/") else callers["tenant"]


def _cross_tenant_read(client: TestClient, callers: dict):
    """A check: a tenant's successful GET of a resource, replayed as another tenant, is a 404."""

    def cross_tenant_read(ctx, response, case):
        if (case.method != "GET" or not 200 <= response.status_code < 300 or "{" not in case.operation.path
                or not case.operation.path.startswith("/v1/") or case.operation.path.startswith("/v1/admin/")):
            return None
        url = response.request.url
        if url.startswith("http://testserver/v1/models/") and '"owned_by":"lorafleet"' in response.text:
            return True  # a base model: shared by every tenant on purpose
        other = client.get(url, headers=callers["other"])
        if other.status_code != 404:
            raise AssertionError(f"another tenant got {other.status_code}, not 404, for {url}")
        return True

    return cross_tenant_read


def _integral_floats_as_ints(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


# Rules a JSON schema cannot state, so a schema-valid body may still be a 422 there: a dataset
# must be JSONL of one format (the document says "binary"), and a job's hyperparameters, method
# and compute are checked against each other, the base model and the tenant's limits.
SEMANTIC_422 = [("/v1/files", "POST"), ("/v1/fine_tuning/jobs", "POST")]
POSITIVE_OK = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' default


def _config() -> schemathesis.config.SchemathesisConfig:
    return schemathesis.config.SchemathesisConfig.from_dict({"operations": [
        {"include-path": path, "include-method": method,
         "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE_OK, "422"]}}}
        for path, method in SEMANTIC_422]})


def _load(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_config())

    # JSON Schema counts 371.0 as an "integer"; the API refuses it on purpose (strict types,
    # docs/API.md), so generated bodies send integers as JSON integers.
    @schema.hook
    def map_body(context, body):
        return _integral_floats_as_ints(body)

    # On the wire a query value is text whatever type it was generated as: a number or boolean
    # generated as "invalid" for a string parameter arrives as a valid string (-80846135 → "-80846135").
    @schema.hook
    def filter_case(context, case):
        if case.meta is None or not case.meta.generation.mode.is_negative:
            return True
        strings = {p.name for p in case.operation.query if "string" in _types(p.definition.get("schema", {}))}
        return not any(name in strings and not isinstance(value, str) for name, value in (case.query or {}).items())

    return schema


def _types(schema: dict) -> set:
    return {schema.get("type"), *(s.get("type") for s in schema.get("anyOf", []))}


def test_api_conforms_to_its_openapi_document(fuzz_app, callers):
    schema = _load(fuzz_app.app)
    cross_tenant = _cross_tenant_read(fuzz_app, callers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30
    sent: list[tuple[str, int]] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                # We send our own credentials, and pin internal routes to a real job: a case that
                # is invalid only there would be made valid, so it proves nothing.
                internal = case.path.startswith("/internal/")
                if case.meta is not None and (case.meta.is_negative_at(ParameterLocation.HEADER)
                                              or internal and case.meta.is_negative_at(ParameterLocation.PATH)):
                    return
                if internal:  # a real job, so handlers run past auth
                    case.path_parameters = {**(case.path_parameters or {}), "job_id": callers["job_id"]}
                response = case.call_and_validate(headers=_headers(case.path, callers), additional_checks=[cross_tenant])
                sent.append((operation.label, response.status_code))

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation.label
    # Every operation was called, and not only answered with errors.
    assert {label for label, _ in sent} == {op.label for op in operations}
    assert sum(200 <= status < 300 for _, status in sent) > len(operations), sorted(set(sent))
    print(f"{len(sent)} requests, {sum(200 <= s < 300 for _, s in sent)} of them 2xx")


def test_stateful_links(fuzz_app, callers):
    machine = _load(fuzz_app.app).as_state_machine()
    links = [name for name in vars(machine) if "___" in name]  # e.g. POST_v1_files___201_…__GET_v1_files_file_id_
    assert len(links) > 20, links  # inferred from the document: ids in responses feed later paths
    cross_tenant = _cross_tenant_read(fuzz_app, callers)

    class Machine(machine):
        def get_call_kwargs(self, case):
            if case.path.startswith("/internal/"):
                case.path_parameters = {**(case.path_parameters or {}), "job_id": callers["job_id"]}
            return {"headers": _headers(case.path, callers)}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            super().validate_response(response, case, [cross_tenant, *(additional_checks or [])], **kwargs)

    Machine.run(settings=settings(max_examples=3, stateful_step_count=STATEFUL_STEPS, deadline=None,
                                  derandomize=True, database=None, suppress_health_check=list(HealthCheck)))
