"""Hostile input costs nothing (issue 10): authentication before the body, a body limit counted
while reading, a body read timeout, bounded JSON nesting, strict cursors, a bounded auth cache,
failed-auth limiting per address, and an OpenAPI document that tells the truth about errors.

The memory and timeout tests run a real uvicorn server in a subprocess (its RSS is measured
with psutil, apart from the test process); the rest use the shared app of conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote

import httpx
import psutil
import pytest
import sqlalchemy as sa
from api_helpers import ADMIN, ADMIN_TOKEN, assert_problem, create_job, make_settings, new_tenant, uploaded_file
from fastapi.testclient import TestClient

from service.api.auth import PrincipalCache
from service.api.schemas.inference import CompletionRequest
from service.db.pages import parse_int_cursor
from service.errors import ValidationFailed
from service.main import create_app
from workers.local_ray import free_port

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
DEEP = 100_000


# --- a real server in its own process -------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, its psutil.Process, a tenant key): uvicorn serving create_app, SQLite."""
    data = tmp_path_factory.mktemp("bounds")
    port = free_port()
    env = {**os.environ, "LORAFLEET_DATA_DIR": str(data), "LORAFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
           "LORAFLEET_DATABASE_URL": f"sqlite:///{data / 'api.db'}", "LORAFLEET_BODY_READ_TIMEOUT_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "uvicorn did not start"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/admin/tenants", json={"name": "bounds"}, headers=ADMIN)
        key = httpx.post(url + f"/v1/admin/tenants/{r.json()['id']}/api_keys", json={}, headers=ADMIN).json()["key"]
        yield url, psutil.Process(proc.pid), key
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _vm_hwm(pid: int) -> int:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class RssGrowth:
    """How far a process's resident memory rose above its level at entry, while in the block.

    Not VmHWM alone: that is the peak since start-up, so a request staying under the start-up
    peak would show no growth at all. At entry the kernel's peak is reset to the current RSS
    (``5`` into /proc/<pid>/clear_refs), and a thread samples the current RSS every 2 ms as well
    (for a kernel that refuses the reset); ``grown`` is the higher of the two peaks less the RSS
    at entry."""

    def __init__(self, process: psutil.Process):
        self.process, self.grown = process, 0

    def __enter__(self) -> RssGrowth:
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._start = self._peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._peak = max(self._peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._sampler.join(timeout=5)
        peak = max(self._peak, self.process.memory_info().rss)
        if self._hwm_reset:
            peak = max(peak, _vm_hwm(self.process.pid))
        self.grown = peak - self._start


def test_rss_growth_sees_growth_below_the_start_up_peak():
    """The measurement itself: a process that peaked at 300 MB while starting, then holds
    80 MB more while measured, grew by 80 MB (its VmHWM did not move)."""
    code = ("import sys, time\nb = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\ndel b\n"
            "print('ready', flush=True)\nsys.stdin.readline()\nc = bytearray(80 << 20)\n"
            "for i in range(0, len(c), 4096): c[i] = 1\nprint('held', flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with RssGrowth(psutil.Process(child.pid)) as growth:
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "held"
        assert 70 * MB < growth.grown < 120 * MB, growth.grown / MB
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        child.wait(timeout=10)


def _raw_request(url: str, head: str, body_bytes: int, *, chunked: bool, first: int = 2 * MB) -> bytes:
    """Send ``head`` and up to ``body_bytes`` of body (raw socket), read the answer. The first
    ``first`` bytes go before reading; the rest is pushed until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    piece = b"{" + b" " * (64 * 1024 - 2) + b"}"
    frame = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head.encode())
        sent = 0
        try:
            while sent < min(first, body_bytes):
                sock.sendall(frame)
                sent += len(piece)
        except OSError:
            pass
        sock.settimeout(15)
        try:
            reply = sock.recv(65536)
        except OSError:
            reply = b""
        try:  # the rest: the server must not take it in (it answered, then closes)
            sock.settimeout(2)
            while sent < body_bytes:
                sock.sendall(frame)
                sent += len(piece)
        except OSError:
            pass
    return reply


@pytest.mark.parametrize("case", ["no_key_declared", "no_key_chunked", "key_declared", "key_chunked"])
def test_a_50mb_body_costs_the_server_under_50mb(server, case):
    url, process, key = server
    httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})  # warm: imports, pools
    size = 50 * MB
    auth = f"Authorization: Bearer {key}\r\n" if case.startswith("key") else ""
    framing = "Transfer-Encoding: chunked\r\n" if case.endswith("chunked") else f"Content-Length: {size}\r\n"
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}{framing}"
            "Content-Type: application/json\r\n\r\n")
    with RssGrowth(process) as growth:
        reply = _raw_request(url, head, size, chunked=case.endswith("chunked"))
    expected = b"HTTP/1.1 401" if case.startswith("no_key") else b"HTTP/1.1 413"
    assert reply.startswith(expected), reply[:300]
    assert b"application/problem+json" in reply
    grown = growth.grown
    print(f"{case}: {reply[:12].decode()}, server RSS rose {grown / MB:.1f} MiB above its level before")
    assert grown < 50 * MB, f"the server's peak RSS grew by {grown / MB:.1f} MiB"
    assert httpx.get(url + "/healthz").status_code == 200


def test_a_body_shorter_than_its_content_length_is_answered_408(server):
    url, _, key = server
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode())
        reply = b""
        while chunk := sock.recv(65536):  # until the server hangs up
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b'"request_timeout"' in reply
    assert time.monotonic() - started < 10  # LORAFLEET_BODY_READ_TIMEOUT_S=2


# --- nesting, cursors, strict types -----------------------------------------------------------

def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/chat/completions", "/v1/completions",
                                  "/v1/admin/tenants"])
def test_deeply_nested_json_body_is_a_4xx(client, tenant, path):
    headers = ADMIN if "/admin/" in path else tenant.headers
    for body in (_deep(DEEP), b'{"model": "m", "messages": [{"role": "user", "content": ' + _deep(DEEP) + b"}]}"):
        r = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    # Just under the parser's limit: deep, but JSON; whatever the answer, not a 500.
    body = b'{"model": "m", "name": "n", "messages": [{"role": "user", "content": [{"x": ' + _deep(900) + b"}]}]}"
    r = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code != 500 and r.headers["content-type"].startswith("application/problem+json"), r.text


def test_a_body_over_the_global_limit_is_413(client, tenant, api_settings):
    body = json.dumps({"model": "m", "prompt": "x" * (api_settings.max_body_bytes + 1)})
    r = client.post("/v1/completions", content=body, headers={**tenant.headers, "Content-Type": "application/json"})
    assert_problem(r, 413, "payload_too_large")

    def chunks():  # no Content-Length: counted while read
        yield b'{"model": "m", "prompt": "'
        for _ in range(api_settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'
    r = client.post("/v1/completions", content=chunks(), headers={**tenant.headers, "Content-Type": "application/json"})
    assert_problem(r, 413, "payload_too_large")


@pytest.mark.parametrize("after", ["%C2%B9", "%D9%A3", "ftevent-%C2%B9", "ftevent-1x", "9" * 40, "ftevent--1"])
def test_a_malformed_event_cursor_is_422(client, tenant, after):
    job_id = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after={after}", headers=tenant.headers)
    assert_problem(r, 422, "validation_error", "after")  # the documented pattern refuses it
    with pytest.raises(ValidationFailed):  # and the parser behind it, for any other caller
        parse_int_cursor(unquote(after), prefix="ftevent-")


@pytest.mark.parametrize("value", [True, 437046.0, "5", 1.5])
def test_admin_integers_are_strict(client, value):
    r = client.post("/v1/admin/tenants", headers=ADMIN, json={"name": "strict", "max_concurrent_jobs": value})
    assert_problem(r, 422, "validation_error", "max_concurrent_jobs")
    tid = new_tenant(client).id
    r = client.patch(f"/v1/admin/tenants/{tid}", headers=ADMIN, json={"requests_per_minute": value})
    assert_problem(r, 422, "validation_error", "requests_per_minute")


# --- authentication -------------------------------------------------------------------------

@pytest.fixture
def strict_app(api_settings):
    """An app of its own (its own limiter and cache): 5 failed authentications per minute."""
    with TestClient(create_app(api_settings.model_copy(update={"failed_auth_per_minute": 5}))) as c:
        yield c


def _queries(app) -> list[str]:
    seen: list[str] = []
    engine = app.state.read_session_factory.kw["bind"]
    sa.event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_failed_authentication_is_limited_per_address_without_db_queries(strict_app):
    good = new_tenant(strict_app)
    assert strict_app.get("/v1/files", headers=good.headers).status_code == 200  # cached now
    queries = _queries(strict_app.app)
    # Random keys in the shape of untagged (pre-tag) keys: only those cost a lookup.
    answers = [strict_app.get("/v1/files", headers={"Authorization": f"Bearer lf-{uuid.uuid4().hex}{'x' * 11}"})
               for _ in range(20)]
    assert [r.status_code for r in answers[:5]] == [401] * 5
    for r in answers[5:]:
        assert_problem(r, 429, "too_many_auth_failures")
        assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len([q for q in queries if "api_keys" in q]) == 5  # one lookup per allowed failure
    # A key already known still works from that address; a repeated bad key is a cached 401.
    assert strict_app.get("/v1/files", headers=good.headers).status_code == 200
    # The admin token is guarded by the same limiter (same address, already spent), the right
    # one included (tests/service/test_api_key_tags.py).
    assert_problem(strict_app.get("/v1/admin/tenants", headers={"Authorization": "Bearer guess"}),
                   429, "too_many_auth_failures")
    assert_problem(strict_app.get("/v1/admin/tenants", headers=ADMIN), 429, "too_many_auth_failures")


def test_auth_happens_before_the_body_is_read(client):
    """A bad key on a POST is answered without reading a byte of the body: the generator that
    would produce it is never started."""
    pulled = []

    def body():
        pulled.append(1)
        yield b"{}"
    r = client.post("/v1/fine_tuning/jobs", content=body(),
                    headers={"Authorization": "Bearer lf-nope", "Content-Type": "application/json"})
    assert r.status_code in (401, 429) and not pulled
    r = client.post("/v1/fine_tuning/jobs", content=body(), headers={"Content-Type": "application/json"})
    assert_problem(r, 401, "unauthorized")
    assert not pulled


def test_the_auth_cache_evicts_least_recently_used_entries(client):
    app = client.app
    cache = PrincipalCache(app.state.read_session_factory, ttl_s=60, max_entries=3)
    tenant = new_tenant(client)
    from service.tenants.repository import hash_key
    cache.load(hash_key(tenant.key))
    for i in range(10):
        cache.load(hash_key(f"lf-random-{i}"))
        cache.cached(hash_key(tenant.key))  # in use: stays
    assert len(cache) == 3
    hit, principal = cache.cached(hash_key(tenant.key))
    assert hit and principal.tenant_id == tenant.id
    assert cache.cached(hash_key("lf-random-0")) == (False, None)  # evicted, not everything cleared


# --- the OpenAPI document -------------------------------------------------------------------

def test_openapi_documents_problem_json_errors_on_every_route(client):
    doc = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    problem = doc["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    operations = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert len(operations) > 30
    for path, method, op in operations:
        errors = {s: r for s, r in op["responses"].items() if s[0] in "45"}
        assert "503" in errors, (path, method)
        for status, response in errors.items():
            assert list(response["content"]) == ["application/problem+json"], (path, method, status)
            assert response["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
        if path.startswith("/v1/"):
            assert {"401", "403", "429"} <= set(errors), (path, method)
        if method in ("post", "patch"):
            assert {"400", "409", "413", "422"} <= set(errors), (path, method)
        if "{" in path:
            assert "404" in errors, (path, method)


def test_openapi_inference_bodies_are_typed_with_matching_examples(client):
    doc = client.get("/openapi.json").json()
    for path, schema in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{schema}"}
        assert "text/event-stream" in doc["paths"][path]["post"]["responses"]["200"]["content"]
    examples = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    for example in examples.values():
        assert "prompt" in example["value"] and "messages" not in example["value"]
        CompletionRequest.model_validate(example["value"])  # the example is a completions body


def test_inference_bodies_are_validated_before_anything_else(client, tenant):
    for path, body in (("/v1/chat/completions", {"model": "m", "messages": []}),
                       ("/v1/chat/completions", {"model": "m", "messages": [{"role": "pirate", "content": "x"}]}),
                       ("/v1/completions", {"model": "m"}),
                       ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": True})):
        r = client.post(path, json=body, headers=tenant.headers)
        assert_problem(r, 422, "validation_error")


def test_unknown_openai_fields_are_allowed(client, tenant):
    """The openai client sends fields we do not use: not a 422 (this app has no serving: 503)."""
    r = client.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": "nope", "messages": [{"role": "user", "content": "hi", "name": "x"}],
        "user": "u1", "logprobs": False, "response_format": {"type": "text"}})
    assert r.status_code in (404, 503) and r.json()["code"] != "validation_error", r.text


@pytest.mark.parametrize("value", [True, 3.0, "3"])
def test_job_integers_are_strict_too(client, tenant, value):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, hyperparameters={"n_epochs": value})
    assert_problem(r, 422, "validation_error")
    r = create_job(client, tenant, file_id, method={"type": "lora", "lora": {"hyperparameters": {"batch_size": value}}})
    assert_problem(r, 422, "validation_error")
    r = create_job(client, tenant, file_id, resources={"num_workers": value})
    assert_problem(r, 422, "validation_error")
