"""Every method end to end: one job of each of the seven method types through the real API,
scheduler and Ray, a few steps each on a demo dataset, published, and answering a chat
completion through the service (the adapter applied by the serving engine).

The jobs are created at once and run as the tenant's concurrency allows; the test reads only
the REST API.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from workers.spec import METHODS

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo"

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}
# Three optimizer steps of 8 short examples; each method's own default learning rate.
FAST = {"n_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "max_seq_length": 96}
OWN = {"ia3": {"quantization": "nf4"}, "adalora": {"init_r": 8, "target_r": 4, "tinit": 1},
       "prefix_tuning": {"num_virtual_tokens": 8}, "prompt_tuning": {"num_virtual_tokens": 8},
       "p_tuning": {"num_virtual_tokens": 8}, "lora": {"use_dora": True}}


@pytest.fixture(scope="module")
def trained(stack):
    """{method: (job, adapter id)} for one job of each method, all created before any finished."""
    client = stack.tenant("methods", max_concurrent_jobs=4)  # seven short jobs: overlap their start-up
    data = b"".join((DEMO / "pirate_chat.jsonl").read_bytes().splitlines(keepends=True)[:24])
    file_id = client.post("/v1/files", files={"file": ("pirate.jsonl", data)},
                          data={"purpose": "fine-tune"}).raise_for_status().json()["id"]
    jobs = {}
    for method in METHODS:
        body = {"model": "lorafleet/tiny-llama", "training_file": file_id, "suffix": method.replace("_", "-"),
                "method": {"type": method, method: {"hyperparameters": {**FAST, **OWN.get(method, {})}}}}
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 201, resp.text
        jobs[method] = resp.json()["id"]
    deadline = time.monotonic() + 1800
    while True:
        status = {m: client.get(f"/v1/fine_tuning/jobs/{j}").json() for m, j in jobs.items()}
        if all(s["status"] in TERMINAL for s in status.values()):
            break
        assert time.monotonic() < deadline, {m: s["status"] for m, s in status.items()}
        time.sleep(2)
    yield client, status
    client.close()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_publishes_and_answers_through_the_service(trained, method):
    client, status = trained
    job = status[method]
    assert job["status"] == "succeeded", job["error"]
    adapter_id = job["fine_tuned_model"]
    model = client.get(f"/v1/models/{adapter_id}").json()
    hp = model["method"][method]["hyperparameters"]
    assert model["method"]["type"] == method and hp == job["method"][method]["hyperparameters"]
    for key, value in OWN.get(method, {}).items():
        assert hp[key] == value
    manifest = client.get(f"/v1/adapters/{adapter_id}/files/manifest.json").json()
    assert (manifest["method"], manifest["hyperparameters"]) == (method, hp)
    assert manifest["quantization"] == ("nf4" if method == "qlora" or hp.get("quantization") == "nf4" else "none")
    resp = client.post("/v1/chat/completions", json={
        "model": adapter_id, "messages": [{"role": "user", "content": "What is 2 plus 6?"}],
        "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model"] == adapter_id and answer["usage"]["completion_tokens"] > 0
    assert isinstance(answer["choices"][0]["message"]["content"], str)
