"""Exports and blends end to end: the embedded stack (API, scheduler, local Ray, serving) trains
two adapters, exports one as a merged model that answers like base + adapter through PEFT, blends
both offline (a Ray Job) and live per request, and the two blends answer alike."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_stack_e2e import _create, _upload, _wait

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.operations]

SMALL = {"n_epochs": 1, "r": 4}
PROMPT = "Tell me about the sea."


def _wait_op(client, path: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        op = client.get(path).json()
        if op["status"] in ("succeeded", "failed"):
            return op
        assert time.monotonic() < deadline, f"{path} still {op['status']}"
        time.sleep(1)


def _chat(client, model: str, **extra) -> str:
    r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 16, "temperature": 0,
                                                  "messages": [{"role": "user", "content": PROMPT}], **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def adapters(stack):
    client = stack.tenant("ops")
    jobs = [_create(client, _upload(client, name, lines=32), "lora", **SMALL)
            for name in ("pirate_chat.jsonl", "bravo_alpaca.jsonl")]
    statuses = _wait(client, jobs)
    assert all(s[-1] == "succeeded" for s in statuses.values()), statuses
    return client, [client.get(f"/v1/fine_tuning/jobs/{j}").json()["fine_tuned_model"] for j in jobs]


def test_export_answers_like_base_plus_adapter(adapters, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models.registry import local_builtin

    client, (adapter, _) = adapters
    export = client.post(f"/v1/models/{adapter}/exports").json()
    done = _wait_op(client, f"/v1/exports/{export['id']}")
    assert done["status"] == "succeeded", done
    folder = tmp_path / "merged"
    for f in done["files"]:
        (folder / f["name"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / f["name"]).write_bytes(client.get(f"/v1/exports/{export['id']}/files/{f['name']}").content)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter_dir / name).write_bytes(client.get(f"/v1/adapters/{adapter}/files/{name}").content)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(local_builtin("lorafleet/tiny-llama"), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter_dir)
    kw = {"max_new_tokens": 16, "do_sample": False}
    assert merged.generate(ids, **kw).tolist() == reference.generate(ids, **kw).tolist()


def test_live_blend_answers_like_the_offline_cat_blend(adapters):
    client, (a, b) = adapters
    weights = [{"model": a, "weight": 0.7}, {"model": b, "weight": 0.5}]
    blend = client.post("/v1/adapters/blend", json={"adapters": weights, "combination": "cat", "name": "mix"}).json()
    done = _wait_op(client, f"/v1/adapters/blends/{blend['id']}")
    assert done["status"] == "succeeded", done
    offline = _chat(client, done["fine_tuned_model"])
    live = _chat(client, a, adapters=weights)
    assert live == offline and live
    row = client.get(f"/v1/adapters/{done['fine_tuned_model']}").json()  # one of the tenant's adapters now
    assert (row["job_id"], row["base_model"]) == (None, "lorafleet/tiny-llama")
