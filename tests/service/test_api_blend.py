"""POST /v1/adapters/blend (offline blend) and the live blend's ``adapters`` field of
chat/completions: ownership of every adapter, one base model, what is refused, what reaches
serving."""

from __future__ import annotations

import pytest
from api_helpers import assert_problem
from fastapi.testclient import TestClient
from ops_helpers import other_base, trained_adapter
from test_api_inference import EchoBackend, _serve_in_thread

from service.main import create_app
from workers.serve.http import create_app as create_serving_app
from workers.signing import Verifier
from sqlalchemy import func, select

from service.db.models import Operation
from api_helpers import SERVE_SIGNING_KEY


def _count(app) -> int:
    with app.state.session_factory() as s:
        return s.scalar(select(func.count()).select_from(Operation))


def test_blend_is_queued_with_its_inputs(client, app, tenant):
    a, b = trained_adapter(client, app, tenant), trained_adapter(client, app, tenant, rank=4)
    r = client.post("/v1/adapters/blend", headers=tenant.headers, json={
        "adapters": [{"model": a, "weight": 0.7}, {"model": b, "weight": 0.3}], "combination": "cat", "name": "mix"})
    assert r.status_code == 201, r.text
    blend = r.json()
    assert (blend["object"], blend["status"], blend["combination"]) == ("adapter.blend", "queued", "cat")
    assert blend["adapters"] == [{"model": a, "weight": 0.7}, {"model": b, "weight": 0.3}]
    assert blend["fine_tuned_model"].startswith("bl-tiny-llama-mix-")
    assert client.get(f"/v1/adapters/blends/{blend['id']}", headers=tenant.headers).json()["id"] == blend["id"]
    assert client.get("/v1/adapters/blends", headers=tenant.headers).json()["data"][0]["id"] == blend["id"]
    events = client.get(f"/v1/adapters/blends/{blend['id']}/events", headers=tenant.headers).json()["data"]
    assert events[-1]["message"] == "Blend queued"
    # Not served before it succeeded: the adapter does not exist yet.
    assert_problem(client.get(f"/v1/models/{blend['fine_tuned_model']}", headers=tenant.headers), 404,
                   "model_not_found")


def test_refused_blends_change_nothing(client, app, tenant, other_tenant):
    mine, theirs = trained_adapter(client, app, tenant), trained_adapter(client, app, other_tenant)
    elsewhere = trained_adapter(client, app, tenant, base=other_base(client))
    small = trained_adapter(client, app, tenant, rank=4)
    big = trained_adapter(client, app, tenant, rank=40)
    before = _count(app)

    def blend(*adapters, **body):
        return client.post("/v1/adapters/blend", headers=tenant.headers, json={
            "adapters": [{"model": m, "weight": 0.5} for m in adapters], "combination": "cat", "name": "x", **body})

    assert_problem(blend(mine, theirs), 404, "model_not_found", "adapters[1].model")  # like a missing one
    assert_problem(blend(mine, "ft-missing"), 404, "model_not_found", "adapters[1].model")
    assert_problem(blend(mine, elsewhere), 422, "adapter_base_mismatch", "adapters")
    assert_problem(blend(mine, mine), 422, "validation_error", "adapters")
    assert_problem(blend(mine, small, combination="linear"), 422, "validation_error", "combination")
    assert_problem(blend(mine, small, combination="ties"), 422, "validation_error", "density")
    big2 = trained_adapter(client, app, tenant, rank=40)
    body = assert_problem(blend(big, big2), 422, "validation_error", "adapters")  # 80 > the base's 64
    assert "rank 80" in body["detail"]
    assert_problem(blend(mine, small, combination="averaging"), 422, "validation_error")
    assert_problem(blend(*[mine] * 9), 422, "validation_error")
    p_tuned = trained_adapter(client, app, tenant, method="p_tuning")
    assert_problem(blend(mine, p_tuned), 422, "not_blendable", "adapters[1].model")
    assert _count(app) == before


class ChatEcho(EchoBackend):
    """A whole chat.completion (what the SDK parses) that also shows the body serving was handed."""

    async def run(self, kind: str, body: dict):
        yield {"response": {"id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "seen": body}}


@pytest.fixture(scope="module")
def proxy(api_settings):
    url, server, thread = _serve_in_thread(create_serving_app(ChatEcho(), Verifier([SERVE_SIGNING_KEY])),
                                           lifespan="off")
    with TestClient(create_app(api_settings.model_copy(update={"serve_url": url}))) as c:
        yield c
    server.should_exit = True
    thread.join(10)


def _chat(proxy, tenant, model, adapters):
    return proxy.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "adapters": adapters})


def test_live_blend_reaches_serving_with_every_adapter_checked(proxy, tenant):
    app = proxy.app
    a, b = trained_adapter(proxy, app, tenant), trained_adapter(proxy, app, tenant)
    r = _chat(proxy, tenant, a, [{"model": a, "weight": 0.7}, {"model": b, "weight": 0.3}])
    assert r.status_code == 200, r.text
    seen = r.json()["seen"]
    assert "adapters" not in seen  # the control plane's routing carries the blend, not the tenant's field
    routing = seen["lorafleet"]
    assert routing["adapter"]["id"] == a
    assert [(p["id"], p["weight"]) for p in routing["blend"]] == [(a, 0.7), (b, 0.3)]
    assert all(p["prefix"].startswith(f"tenants/{tenant.id}/adapters/{p['id']}/") for p in routing["blend"])


def test_live_blend_refusals(proxy, tenant, other_tenant):
    app = proxy.app
    a, theirs = trained_adapter(proxy, app, tenant), trained_adapter(proxy, app, other_tenant)
    b = trained_adapter(proxy, app, tenant)
    elsewhere = trained_adapter(proxy, app, tenant, base=other_base(proxy))
    assert_problem(_chat(proxy, tenant, a, [{"model": a}, {"model": theirs}]), 404, "model_not_found",
                   "adapters[1].model")
    assert_problem(_chat(proxy, tenant, a, [{"model": a}, {"model": elsewhere}]), 422, "adapter_base_mismatch",
                   "adapters")
    assert_problem(_chat(proxy, tenant, a, [{"model": b}]), 422, "validation_error", "model")
    assert_problem(_chat(proxy, tenant, a, [{"model": a, "weight": "lots"}]), 422, "validation_error",
                   "adapters[0].weight")
    assert_problem(_chat(proxy, tenant, a, [{"model": a, "extra": 1}]), 422, "validation_error")
    assert_problem(_chat(proxy, tenant, a, []), 422, "validation_error", "adapters")
    assert_problem(_chat(proxy, tenant, "lorafleet/tiny-llama", [{"model": a}]), 422, "validation_error", "model")


def test_sdk_sends_a_live_blend_as_the_openai_client_does(proxy, tenant):
    import lorafleet

    app = proxy.app
    a, b = trained_adapter(proxy, app, tenant), trained_adapter(proxy, app, tenant)
    sdk = lorafleet.Client(base_url=str(proxy.base_url), api_key=tenant.key, http_client=proxy, max_retries=0)
    weights = [{"model": a, "weight": 0.7}, {"model": b, "weight": 0.3}]
    for kw in ({"extra_body": {"adapters": weights}}, {"adapters": weights}):
        out = sdk.chat.completions.create(model=a, messages=[{"role": "user", "content": "hi"}], **kw)
        seen = out.model_extra["seen"]
        assert "extra_body" not in seen and [p["id"] for p in seen["lorafleet"]["blend"]] == [a, b]
