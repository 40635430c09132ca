"""The Ray Serve application on a real local Ray: deploy, then a chat completion with an adapter."""

from __future__ import annotations

import socket

import httpx
import pytest

from workers.serve import synthetic

BASE_ID = "test/tiny-random-llama"


@pytest.mark.ray
@pytest.mark.slow
def test_ray_serve_app_answers_with_an_adapter(tiny, ray_cluster, tmp_path, monkeypatch):
    import ray
    from ray import serve

    from signed_http import KEY, signed_http, signed_openai

    from workers.serve.app import build_app
    from workers.signing import KEY_ENV
    from workers.storage import LocalStore

    store = LocalStore(tmp_path / "objects")
    prefix = "tenants/tn_a/adapters/ft-ad8/v1"
    synthetic.publish_adapter(store, tiny.adapter_dirs["ad8"], prefix, adapter_id="ft-ad8", base_model_id=BASE_ID)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(KEY_ENV, KEY)  # build_app hands it to the ingress
    ray.init(address=ray_cluster["address"])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"base_model_id": BASE_ID, "base_model_uri": str(tiny.base_dir),
                             "object_store_url": store.url, "max_batch": 4, "max_len": 128,
                             "max_rank": 16, "adapter_slots": 2, "max_replicas": 1,
                             "num_cpus": 0.5}),
                  name="lorafleet-serve-test", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        # Unsigned: refused by the ingress, whatever the routing says.
        forged = httpx.post(f"{url}/v1/chat/completions", json={"model": "ft-ad8", "messages": []})
        assert forged.status_code == 401 and forged.json()["code"] == "invalid_signature"
        assert httpx.get(f"{url}/internal/v1/stats").status_code == 401
        client = signed_openai(url)
        routing = {"lorafleet": {"adapter": {"id": "ft-ad8", "prefix": prefix, "base_model_id": BASE_ID},
                                 "base_model": {"id": BASE_ID, "uri": str(tiny.base_dir)}}}
        messages = [{"role": "user", "content": "Hello, how are you today?"}]
        resp = client.chat.completions.create(model="ft-ad8", messages=messages, max_tokens=8,
                                              temperature=0, extra_body=routing)
        assert resp.choices[0].message.role == "assistant" and resp.usage.completion_tokens >= 1
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="ft-ad8", messages=messages, max_tokens=8, temperature=0, stream=True, extra_body=routing))
        assert streamed == resp.choices[0].message.content
        base = client.chat.completions.create(model=BASE_ID, messages=messages, max_tokens=8, temperature=0)
        assert base.choices[0].message.content != resp.choices[0].message.content
        stats = signed_http(url).get("/internal/v1/stats").json()
        assert stats["adapters"]["host"]["loads"] == 1
        evicted = signed_http(url).delete("/internal/v1/adapters/ft-ad8").json()
        assert evicted == {"id": "ft-ad8", "evicted": True}
    finally:
        serve.shutdown()
        ray.shutdown()
