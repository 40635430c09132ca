"""The official ``openai`` client against the HTTP ingress under uvicorn on a loopback port,
signing as the control plane does; and everything else that reaches it refused before it acts."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import httpx
import openai
import pytest
import uvicorn
from signed_http import KEY, PREVIOUS_KEY, signed_http, signed_openai

from workers.serve import synthetic
from workers.serve.http import create_app
from workers.serve.replica import ServeConfig, build_front
from workers.signing import Signer, Verifier

BASE_ID = "test/tiny-random-llama"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """A replica over the tiny base (loaded from its local directory) and a local object store
    holding two published adapters and one tampered with."""
    from workers.storage import LocalStore, put_bytes

    store = LocalStore(tmp_path_factory.mktemp("objects"))
    prefixes = {}
    for name in ("ad8", "ad16"):
        prefixes[name] = f"tenants/tn_a/adapters/ft-{name}/v1"
        synthetic.publish_adapter(store, tiny.adapter_dirs[name], prefixes[name], adapter_id=f"ft-{name}",
                                  base_model_id=BASE_ID)
    prefixes["bad"] = "tenants/tn_a/adapters/ft-bad/v1"
    synthetic.publish_adapter(store, tiny.adapter_dirs["ad8"], prefixes["bad"], adapter_id="ft-bad",
                              base_model_id=BASE_ID)
    put_bytes(store, f"{prefixes['bad']}/adapter_model.safetensors", b"not the bytes the manifest names")

    config = ServeConfig.load(base_model_id=BASE_ID, base_model_uri=str(tiny.base_dir),
                              object_store_url=store.url, max_batch=8, max_len=256, max_rank=16,
                              adapter_slots=4, default_max_tokens=16)
    front = build_front(config, store)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Mid-rotation: the current key and the one before it are both accepted.
    app = create_app(front, Verifier([KEY, PREVIOUS_KEY]))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                       log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "prefixes": prefixes}
    uv.should_exit = True
    thread.join(10)
    front.close()


def routing(server, name: str | None) -> dict:
    adapter = None if name is None else {"id": f"ft-{name}", "prefix": server["prefixes"][name],
                                         "base_model_id": BASE_ID}
    return {"lorafleet": {"adapter": adapter, "base_model": {"id": BASE_ID, "uri": "x"}}}


def client(server) -> openai.OpenAI:
    return signed_openai(server["url"])


def http(server) -> httpx.Client:
    return signed_http(server["url"], timeout=60)


MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


def test_chat_completion_with_adapters_and_streaming(server):
    c = client(server)
    answers = {}
    for name in ("ad8", "ad16", None):
        resp = c.chat.completions.create(model=f"ft-{name}" if name else BASE_ID, messages=MESSAGES,
                                         max_tokens=12, temperature=0, extra_body=routing(server, name))
        assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
        assert resp.usage.completion_tokens >= 1
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        answers[name] = resp.choices[0].message.content
    assert len(set(answers.values())) == 3, answers  # two tenants' adapters answer differently

    stream = c.chat.completions.create(model="ft-ad8", messages=MESSAGES, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body=routing(server, "ad8"))
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == answers["ad8"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_completions_raw_prompt_and_stream(server):
    c = client(server)
    resp = c.completions.create(model="ft-ad16", prompt="LoRA adapters are", max_tokens=8, temperature=0,
                                extra_body=routing(server, "ad16"))
    assert resp.object == "text_completion" and resp.usage.prompt_tokens > 0
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="ft-ad16", prompt="LoRA adapters are", max_tokens=8, temperature=0, stream=True,
        extra_body=routing(server, "ad16")))
    assert streamed == resp.choices[0].text


def test_errors_are_problem_json(server):
    c = client(server)
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        c.chat.completions.create(model="ft-bad", messages=MESSAGES, extra_body=routing(server, "bad"))
    assert exc.value.body["code"] == "adapter_checksum_mismatch"
    assert "adapter_model.safetensors has sha256" in exc.value.message
    # An adapter id without routing from the control plane never falls back to the base model.
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="ft-unknown", messages=MESSAGES)
    r = http(server).post("/v1/chat/completions", json={"model": BASE_ID, "messages": []})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["param"] == "messages" and r.headers["x-request-id"].startswith("req_")


def test_evict_and_stats(server):
    c = client(server)
    c.chat.completions.create(model="ft-ad8", messages=MESSAGES, max_tokens=2, extra_body=routing(server, "ad8"))
    stats = http(server).get("/internal/v1/stats").json()
    assert stats["adapters"]["host"]["loads"] >= 1 and stats["engine"]["decode_tokens"] > 0
    assert http(server).delete("/internal/v1/adapters/ft-ad8").json() == {"id": "ft-ad8", "evicted": True}
    after = http(server).get("/internal/v1/stats").json()["adapters"]
    assert after["host"]["adapters"] == stats["adapters"]["host"]["adapters"] - 1
    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}


def test_concurrent_requests_for_different_adapters_share_the_batch(server):
    from concurrent.futures import ThreadPoolExecutor

    c = client(server)

    def ask(name):
        resp = c.chat.completions.create(model=f"ft-{name}" if name else BASE_ID, messages=MESSAGES,
                                         max_tokens=12, temperature=0, extra_body=routing(server, name))
        return resp.choices[0].message.content

    names = ["ad8", "ad16", None] * 2
    alone = {name: ask(name) for name in set(names)}
    before = http(server).get("/internal/v1/stats").json()["engine"]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, names))
    after = http(server).get("/internal/v1/stats").json()["engine"]
    assert together == [alone[n] for n in names]
    decoded = after["decode_tokens"] - before["decode_tokens"]
    assert after["steps"] - before["steps"] < decoded  # several rows per step


def test_a_client_leaving_a_stream_aborts_its_generation(server):
    body = {"model": "ft-ad16", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True,
            **routing(server, "ad16")}
    before = http(server).get("/internal/v1/stats").json()["engine"]["decode_tokens"]
    with http(server).stream("POST", "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 10
    while (engine := http(server).get("/internal/v1/stats").json()["engine"])["running"]:
        assert time.monotonic() < deadline, "the abandoned stream kept generating"
        time.sleep(0.05)
    assert engine["decode_tokens"] - before < 150  # stopped well before its 200 tokens


# -- only the control plane gets in -------------------------------------------------------------


def _signed_raw(path: str, body: bytes = b"", *, key: str = KEY, method: str = "POST",
                clock=time.time, request_id: str | None = None) -> dict[str, str]:
    rid = request_id or f"req_{uuid.uuid4().hex[:16]}"
    return {"content-type": "application/json",
            **Signer(key, clock=clock).headers(method, path, body, tenant="tn_a", request_id=rid)}


def _forged_body(server, name: str = "ad16") -> bytes:
    """Another tenant's adapter, routing written by hand: what an attacker in the cluster sends."""
    return json.dumps({"model": f"ft-{name}", "messages": MESSAGES, "max_tokens": 2,
                       **routing(server, name)}).encode()


def _assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "invalid_signature" and r.json()["error"]["code"] == "invalid_signature"


def test_unsigned_or_badly_signed_requests_are_refused_before_the_cache(server):
    url, path = server["url"], "/v1/chat/completions"
    host_loads = http(server).get("/internal/v1/stats").json()["adapters"]["host"]["loads"]
    body = _forged_body(server)
    refused = {
        "no key": httpx.post(url + path, content=body, headers={"content-type": "application/json"}),
        "bad key": httpx.post(url + path, content=body, headers=_signed_raw(path, body, key="guessed")),
        "expired": httpx.post(url + path, content=body,
                              headers=_signed_raw(path, body, clock=lambda: time.time() - 120)),
        "from the far future": httpx.post(url + path, content=body,
                                          headers=_signed_raw(path, body, clock=lambda: time.time() + 3600)),
        # Signed for a base-model request, sent with another tenant's routing in the body.
        "tampered routing": httpx.post(url + path, content=body, headers=_signed_raw(
            path, json.dumps({"model": BASE_ID, "messages": MESSAGES, **routing(server, None)}).encode())),
        "signed for another path": httpx.post(url + path, content=body,
                                              headers=_signed_raw("/v1/completions", body)),
        "signed for another method": httpx.post(url + path, content=body,
                                                headers=_signed_raw(path, body, method="PUT")),
    }
    for why, r in refused.items():
        assert r.status_code == 401, (why, r.text)
        _assert_refused(r)
    # None of them reached the adapter cache.
    assert http(server).get("/internal/v1/stats").json()["adapters"]["host"]["loads"] == host_loads


def test_internal_routes_need_a_signature_too(server):
    url = server["url"]
    _assert_refused(httpx.get(url + "/internal/v1/stats"))
    _assert_refused(httpx.delete(url + "/internal/v1/adapters/ft-ad8"))
    # A signature for one adapter's eviction does not evict another.
    headers = _signed_raw("/internal/v1/adapters/ft-ad8", method="DELETE")
    _assert_refused(httpx.delete(url + "/internal/v1/adapters/ft-ad16", headers=headers))
    # A stats signature does not open the eviction route.
    _assert_refused(httpx.delete(url + "/internal/v1/adapters/ft-ad8",
                                 headers=_signed_raw("/internal/v1/stats", method="GET")))
    assert httpx.get(url + "/healthz").status_code == 200  # the only open route


def test_a_signed_request_is_accepted_once(server):
    path = "/v1/completions"
    body = json.dumps({"model": BASE_ID, "prompt": "Hi", "max_tokens": 2}).encode()
    headers = _signed_raw(path, body)
    first = httpx.post(server["url"] + path, content=body, headers=headers)
    assert first.status_code == 200, first.text
    _assert_refused(httpx.post(server["url"] + path, content=body, headers=headers))


def test_previous_key_still_accepted_during_rotation(server):
    resp = signed_openai(server["url"], key=PREVIOUS_KEY).completions.create(
        model=BASE_ID, prompt="Hi", max_tokens=2, extra_body=routing(server, None))
    assert resp.usage.completion_tokens >= 1


def test_request_id_is_the_signed_one_never_the_callers(server):
    path = "/v1/completions"
    body = json.dumps({"model": BASE_ID, "prompt": "Hi", "max_tokens": 2}).encode()
    headers = _signed_raw(path, body, request_id="req_fromcontrolplane1") | {"x-request-id": "attacker-chosen-id"}
    r = httpx.post(server["url"] + path, content=body, headers=headers)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req_fromcontrolplane1"
    unsigned = httpx.post(server["url"] + path, content=body, headers={"x-request-id": "attacker-chosen"})
    assert unsigned.status_code == 401 and unsigned.headers["x-request-id"].startswith("req_")
    assert unsigned.headers["x-request-id"] != "attacker-chosen"
    assert unsigned.json()["request_id"] == unsigned.headers["x-request-id"]


def test_oversized_unsigned_body_is_refused_without_buffering(server):
    from workers.serve import http as serve_http

    big = b"x" * (serve_http.MAX_BODY_BYTES + 1)
    r = httpx.post(server["url"] + "/v1/completions", content=big,
                   headers=_signed_raw("/v1/completions", big))
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
