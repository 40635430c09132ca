"""The official ``openai`` client against the HTTP ingress under uvicorn on a loopback port."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from workers.serve import synthetic
from workers.serve.http import create_app
from workers.serve.replica import ServeConfig, build_front

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
    uv = uvicorn.Server(uvicorn.Config(create_app(front), host="127.0.0.1", port=port,
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
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused-here", max_retries=0)


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
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": BASE_ID, "messages": []})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["param"] == "messages" and r.headers["x-request-id"].startswith("req_")


def test_evict_and_stats(server):
    c = client(server)
    c.chat.completions.create(model="ft-ad8", messages=MESSAGES, max_tokens=2, extra_body=routing(server, "ad8"))
    stats = httpx.get(server["url"] + "/internal/v1/stats").json()
    assert stats["adapters"]["host"]["loads"] >= 1 and stats["engine"]["decode_tokens"] > 0
    assert httpx.delete(server["url"] + "/internal/v1/adapters/ft-ad8").json() == {"id": "ft-ad8", "evicted": True}
    after = httpx.get(server["url"] + "/internal/v1/stats").json()["adapters"]
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
    before = httpx.get(server["url"] + "/internal/v1/stats").json()["engine"]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, names))
    after = httpx.get(server["url"] + "/internal/v1/stats").json()["engine"]
    assert together == [alone[n] for n in names]
    decoded = after["decode_tokens"] - before["decode_tokens"]
    assert after["steps"] - before["steps"] < decoded  # several rows per step


def test_a_client_leaving_a_stream_aborts_its_generation(server):
    body = {"model": "ft-ad16", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True,
            **routing(server, "ad16")}
    before = httpx.get(server["url"] + "/internal/v1/stats").json()["engine"]["decode_tokens"]
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 10
    while (engine := httpx.get(server["url"] + "/internal/v1/stats").json()["engine"])["running"]:
        assert time.monotonic() < deadline, "the abandoned stream kept generating"
        time.sleep(0.05)
    assert engine["decode_tokens"] - before < 150  # stopped well before its 200 tokens
