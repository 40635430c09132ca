"""Inference proxy: model resolution and ownership, the ``lorafleet`` routing field, SSE passthrough.

The serving side is a tiny echo app on a loopback port (``serve_url`` in conftest: a test double;
the real serving engine is tested with the workers)."""

from __future__ import annotations

import json
import socket

import pytest
from api_helpers import assert_problem, create_job, publish_adapter, uploaded_file
from fastapi.testclient import TestClient

from service.db.models import Job
from service.jobs import states
from service.main import create_app
from service.security import job_token


@pytest.fixture
def proxy(api_settings, serve_url):
    with TestClient(create_app(api_settings.model_copy(update={"serve_url": serve_url}))) as c:
        yield c


def _adapter_of(client, app, tenant) -> str:
    job_id = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.RUNNING)
        s.commit()
    worker = {"Authorization": f"Bearer {job_token(job_id, 0, app.state.settings, ttl_s=3600)}"}
    return client.post(f"/internal/v1/jobs/{job_id}/result", headers=worker,
                       json={"manifest_key": publish_adapter(app, job_id)}).json()["adapter_id"]


def test_adapter_request_is_forwarded_with_routing(proxy, tenant):
    adapter_id = _adapter_of(proxy, proxy.app, tenant)
    r = proxy.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": adapter_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
        "lorafleet": {"adapter": {"id": "someone-elses", "prefix": "tenants/x"}}})
    assert r.status_code == 200, r.text
    seen = r.json()["seen"]
    assert seen["max_tokens"] == 5 and seen["messages"][0]["content"] == "hi"
    routing = seen["lorafleet"]  # set by the control plane; the tenant's own field is dropped
    assert routing["adapter"]["id"] == adapter_id
    assert routing["adapter"]["prefix"].startswith(f"tenants/{tenant.id}/adapters/{adapter_id}/")
    assert routing["base_model"] == {"id": "lorafleet/tiny-llama", "uri": "builtin://lorafleet/tiny-llama"}


def test_base_model_and_completions_route(proxy, tenant):
    r = proxy.post("/v1/completions", headers=tenant.headers,
                   json={"model": "lorafleet/tiny-llama", "prompt": "Once"})
    assert r.status_code == 200 and r.json()["object"] == "completions"
    assert r.json()["seen"]["lorafleet"]["adapter"] is None


def test_streaming_is_passed_through_as_sse(proxy, tenant):
    with proxy.stream("POST", "/v1/chat/completions", headers=tenant.headers, json={
            "model": "lorafleet/tiny-llama", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    words = [json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines[:2]]
    assert words == ["ahoy", "matey"]


def test_unknown_or_foreign_models_are_404_never_the_base(proxy, tenant, other_tenant):
    theirs = _adapter_of(proxy, proxy.app, other_tenant)
    for model in (theirs, "ft-tiny-llama-lora-00000000", "gpt-4"):
        r = proxy.post("/v1/chat/completions", headers=tenant.headers,
                       json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert_problem(r, 404, "model_not_found", "model")
    assert_problem(proxy.post("/v1/chat/completions", headers=tenant.headers, json={"messages": []}),
                   422, "validation_error", "model")


def test_no_serving_configured_is_503(client, tenant):
    r = client.post("/v1/chat/completions", headers=tenant.headers,
                    json={"model": "lorafleet/tiny-llama", "messages": [{"role": "user", "content": "x"}]})
    assert_problem(r, 503, "serving_unavailable")


def test_unreachable_serving_is_503(api_settings, tenant):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with TestClient(create_app(api_settings.model_copy(update={"serve_url": dead}))) as c:
        r = c.post("/v1/completions", headers=tenant.headers, json={"model": "lorafleet/tiny-llama", "prompt": "x"})
    assert_problem(r, 503, "serving_unavailable")
