"""Inference proxy: model resolution and ownership, the ``lorafleet`` routing field, SSE passthrough,
signatures, and fairness between tenants.

The serving side is the real serving HTTP app (``workers.serve.http``: it verifies the control
plane's signatures) on a loopback port, over a backend that echoes the body it was handed instead
of running a model (the engine is tested with the workers)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import ExitStack

import httpx
import pytest
import uvicorn
from api_helpers import SERVE_SIGNING_KEY, assert_problem, create_job, new_tenant, publish_adapter, uploaded_file
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.db.models import Job
from service.jobs import states
from service.main import create_app
from service.security import job_token
from workers.serve.http import create_app as create_serving_app
from workers.signing import Verifier


class EchoBackend:
    """Answers with the body the serving app handed it. Streams for ``prompt: "hold"`` stay open
    until ``release`` is set; evictions are recorded."""

    def __init__(self):
        self.release = threading.Event()
        self.evicted: list[str] = []

    async def run(self, kind: str, body: dict):
        if not body.get("stream"):
            yield {"response": {"object": kind, "seen": body, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}}
            return
        for word in ("ahoy", "matey"):
            yield {"chunk": {"choices": [{"delta": {"content": word}}]}}
        while body.get("prompt") == "hold" and not self.release.is_set():
            await asyncio.sleep(0.01)
        yield {"chunk": {"seen": body}}

    async def evict(self, adapter_id: str) -> bool:
        self.evicted.append(adapter_id)
        return True

    async def stats(self) -> dict:
        return {}


def _serve_in_thread(app, **config) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def serving():
    backend = EchoBackend()
    url, server, thread = _serve_in_thread(create_serving_app(backend, Verifier([SERVE_SIGNING_KEY])),
                                           lifespan="off")
    yield {"url": url, "backend": backend}
    backend.release.set()
    server.should_exit = True
    thread.join(10)


def _proxy(api_settings, serving, **updates) -> TestClient:
    return TestClient(create_app(api_settings.model_copy(update={"serve_url": serving["url"], **updates})))


@pytest.fixture
def proxy(api_settings, serving):
    with _proxy(api_settings, serving) as c:
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
    # One request id, the API's (serving's own headers are not repeated).
    assert len(r.headers.get_list("x-request-id")) == 1 and "server" not in r.headers


def test_base_model_and_completions_route(proxy, tenant):
    r = proxy.post("/v1/completions", headers=tenant.headers,
                   json={"model": "lorafleet/tiny-llama", "prompt": "Once"})
    assert r.status_code == 200 and r.json()["object"] == "completion"
    assert r.json()["seen"]["lorafleet"]["adapter"] is None


def test_streaming_is_passed_through_as_sse(proxy, tenant):
    with proxy.stream("POST", "/v1/chat/completions", headers=tenant.headers, json={
            "model": "lorafleet/tiny-llama", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    words = [json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines[:2]]
    assert words == ["ahoy", "matey"]


async def _serving_that_dies_mid_stream(scope, receive, send):
    """Sends the first event, then its connection drops (as when a serving pod is killed)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "more_body": True,
                "body": b'data: {"choices": [{"delta": {"content": "ahoy"}}]}\n\n'})
    raise RuntimeError("replica lost")


def test_a_stream_serving_breaks_off_ends_with_an_error_event_and_frees_the_slot(api_settings, tenant):
    url, server, thread = _serve_in_thread(_serving_that_dies_mid_stream, lifespan="off")
    try:
        with TestClient(create_app(api_settings.model_copy(update={"serve_url": url}))) as c:
            with c.stream("POST", "/v1/completions", headers=tenant.headers, json={
                    "model": "lorafleet/tiny-llama", "stream": True, "prompt": "x"}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert not c.app.state.inference_limits.open.get(tenant.id)
    finally:
        server.should_exit = True
        thread.join(10)
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == "ahoy"
    error = json.loads(lines[-1][6:])["error"]
    assert error["code"] == "serving_unavailable" and "replica lost" not in error["message"]


BASE = "lorafleet/tiny-llama"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, param", [
    # A text part must hold a string: serving could not read it (it answered 500/503).
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content"),
    # seed is an int64 (PyTorch's overflow text reached the tenant).
    ("/v1/completions", {"prompt": "x", "seed": 2**64, "temperature": 1}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, "seed"),
    # Stop strings: up to 4, each up to 256 characters (they are searched on every decode step).
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "s" * 257]}, "stop"),
])
def test_input_serving_cannot_serve_is_our_422_before_the_proxy_hop(proxy, tenant, path, body, param):
    r = proxy.post(path, headers=tenant.headers, json={"model": BASE, **body})
    problem = assert_problem(r, 422, "validation_error")
    assert problem["param"].startswith(param), problem


def test_input_at_the_bounds_is_forwarded(proxy, tenant):
    r = proxy.post("/v1/completions", headers=tenant.headers,
                   json={"model": BASE, "prompt": "x", "seed": 2**63 - 1, "stop": ["s" * 256] * 4})
    assert r.status_code == 200, r.text
    assert r.json()["seen"]["seed"] == 2**63 - 1
    content = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "u"}}]
    r = proxy.post("/v1/chat/completions", headers=tenant.headers,
                   json={"model": BASE, "messages": [{"role": "user", "content": content}], "seed": -(2**63)})
    assert r.status_code == 200 and r.json()["seen"]["messages"][0]["content"] == content, r.text


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
    assert "Connect" not in r.json()["detail"]  # our words, not httpx's


# -- signatures -----------------------------------------------------------------------------------


def test_a_key_serving_does_not_know_is_our_503_never_the_tenants_401(api_settings, serving, tenant):
    with _proxy(api_settings, serving, serve_signing_key=SecretStr("a-key-serving-never-saw")) as c:
        r = c.post("/v1/completions", headers=tenant.headers, json={"model": "lorafleet/tiny-llama", "prompt": "x"})
    assert_problem(r, 503, "serving_unavailable")


def test_no_signing_key_configured_is_503(api_settings, serving, tenant):
    with _proxy(api_settings, serving, serve_signing_key=None) as c:
        r = c.post("/v1/completions", headers=tenant.headers, json={"model": "lorafleet/tiny-llama", "prompt": "x"})
    assert_problem(r, 503, "serving_unavailable")


def test_deleting_an_adapter_evicts_it_from_serving_with_a_signed_request(proxy, serving, tenant):
    adapter_id = _adapter_of(proxy, proxy.app, tenant)
    assert proxy.delete(f"/v1/models/{adapter_id}", headers=tenant.headers).status_code == 200
    assert adapter_id in serving["backend"].evicted  # serving accepted the signature


# -- fairness: one tenant cannot hold everyone's connections ---------------------------------------

CAP = 2


@pytest.fixture(scope="module")
def live_api(api_settings, serving):
    """The API under uvicorn (streams really stay open), a cap of CAP per tenant, a short pool wait."""
    app = create_app(api_settings.model_copy(update={
        "serve_url": serving["url"], "tenant_max_concurrent_inference": CAP, "serve_pool_timeout_s": 0.3}))
    url, server, thread = _serve_in_thread(app)
    yield {"url": url, "app": app}
    serving["backend"].release.set()
    server.should_exit = True
    thread.join(10)


HOLD = {"model": "lorafleet/tiny-llama", "prompt": "hold", "stream": True}
QUICK = {"model": "lorafleet/tiny-llama", "prompt": "quick"}


def _open_stream(stack: ExitStack, url: str, tenant) -> httpx.Response:
    """A held stream, open until the backend is released (its first event already arrived)."""
    http = stack.enter_context(httpx.Client(base_url=url, timeout=30))
    r = stack.enter_context(http.stream("POST", "/v1/completions", headers=tenant.headers, json=HOLD))
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    stack.callback(lines.close)  # (dropping the iterator would close the connection now)
    return r


def _wait_until_free(app, tenant_id: str) -> None:
    deadline = time.monotonic() + 10
    while app.state.inference_limits.open.get(tenant_id):
        assert time.monotonic() < deadline, "the tenant's slots were never released"
        time.sleep(0.02)


def test_per_tenant_cap_is_429_while_other_tenants_get_through(live_api, serving, client):
    greedy, polite = new_tenant(client), new_tenant(client)
    url, backend = live_api["url"], serving["backend"]
    backend.release.clear()
    with ExitStack() as streams:
        for _ in range(CAP):
            _open_stream(streams, url, greedy)
        r = httpx.post(url + "/v1/completions", headers=greedy.headers, json=QUICK)
        assert_problem(r, 429, "too_many_concurrent_requests")
        assert r.headers["retry-after"] == "1"
        ok = httpx.post(url + "/v1/completions", headers=polite.headers, json=QUICK)
        assert ok.status_code == 200, ok.text
        # One copy of each of our headers; serving's own are not passed on.
        for name in ("server", "date", "x-request-id"):
            assert len(ok.headers.get_list(name)) == 1, (name, ok.headers)
        backend.release.set()
    _wait_until_free(live_api["app"], greedy.id)
    assert httpx.post(url + "/v1/completions", headers=greedy.headers, json=QUICK).status_code == 200


def test_a_client_that_leaves_a_stream_frees_its_slot(live_api, serving, client):
    tenant = new_tenant(client)
    serving["backend"].release.clear()
    try:
        for _ in range(3):  # more than the cap, one after the other: each left stream is released
            with ExitStack() as streams:
                _open_stream(streams, live_api["url"], tenant)
            _wait_until_free(live_api["app"], tenant.id)
    finally:
        serving["backend"].release.set()


def test_no_free_connection_to_serving_is_a_quick_503(live_api, serving, client):
    """Other tenants' streams hold every pooled connection: a wait of serve_pool_timeout_s, then
    503 with Retry-After, never a hang."""
    app = live_api["app"]
    shared, app.state.http = app.state.http, httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
    serving["backend"].release.clear()
    try:
        with ExitStack() as streams:
            _open_stream(streams, live_api["url"], new_tenant(client))
            started = time.monotonic()
            r = httpx.post(live_api["url"] + "/v1/completions", headers=new_tenant(client).headers, json=QUICK)
            assert_problem(r, 503, "serving_busy")
            assert r.headers["retry-after"] == "1" and time.monotonic() - started < 5
            serving["backend"].release.set()
    finally:
        serving["backend"].release.set()
        app.state.http = shared
