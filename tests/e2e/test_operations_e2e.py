"""Exports and blends end to end: the embedded stack (API, scheduler, local Ray, serving) trains
two adapters, exports one as a merged model that answers like base + adapter through PEFT, blends
both offline (a Ray Job) and live per request, and the two blends answer alike."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_stack_e2e import _create, _events, _upload, _wait

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.operations]

SMALL = {"n_epochs": 1, "r": 4}
GROWN = {"n_epochs": 2, "r": 4, "rank_schedule": [[0, 2], [1, 4]]}
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
    """Two LoRA adapters; the second grown from rank 2 to 4 (rank_schedule) on the way."""
    client = stack.tenant("ops")
    jobs = [_create(client, _upload(client, name, lines=32), "lora", **hp) for name, hp in (
        ("pirate_chat.jsonl", SMALL), ("bravo_alpaca.jsonl", GROWN))]
    statuses = _wait(client, jobs)
    assert all(s[-1] == "succeeded" for s in statuses.values()), statuses
    return client, [client.get(f"/v1/fine_tuning/jobs/{j}").json()["fine_tuned_model"] for j in jobs]


def test_rank_schedule_grows_the_adapter_through_the_api(adapters):
    client, (_, grown) = adapters
    model = client.get(f"/v1/models/{grown}").json()
    assert model["method"]["lora"]["hyperparameters"]["rank_schedule"] == GROWN["rank_schedule"]
    job_id = client.get(f"/v1/adapters/{grown}").json()["job_id"]
    growth = [e["data"] for e in _events(client, job_id) if e["type"] == "status" and "rank" in (e.get("data") or {})]
    assert [(g["epoch"], g["rank"]) for g in growth] == [(1, 4)], growth
    config = client.get(f"/v1/adapters/{grown}/files/adapter_config.json").json()
    assert config["r"] == 4  # the published adapter has the final rank, and serves (the blend tests)


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


def _wait_status(client, job_id: str, wanted: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] != wanted:
        assert job["status"] not in ("succeeded", "failed", "cancelled"), job
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}, not {wanted}"
        time.sleep(0.5)
    return job


def test_pause_then_resume_continues_from_the_pause(stack):
    """Paused mid-run by the API: the run checkpoints where it stands and stops, the job holds no
    run while paused, and the resumed run starts at the next step and finishes the job."""
    from test_stack_e2e import _events

    client = stack.tenant("ops-pause")
    # 96 examples, batch 8: 12 steps an epoch, 120 in all (long enough to be paused mid-run),
    # checkpoints only at epoch ends
    job_id = _create(client, _upload(client, "pirate_chat.jsonl"), "lora", n_epochs=10, checkpoint_steps=0)
    deadline = time.monotonic() + 600
    while not any(e["type"] == "metrics" and e["data"].get("step", 0) >= 2 for e in _events(client, job_id)):
        assert time.monotonic() < deadline, "no training step within 600 s"
        time.sleep(0.5)
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert r.status_code == 200 and r.json()["status"] == "pausing", r.text
    _wait_status(client, job_id, "paused")
    events = _events(client, job_id)
    (paused_at,) = [e["data"]["step"] for e in events if e["message"].startswith("paused at step")]
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert paused_at in {c["step_number"] for c in checkpoints} and paused_at < 120
    assert any(e["message"] == f"Job paused at step {paused_at}" for e in events)
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    statuses = _wait(client, [job_id])
    assert statuses[job_id][-1] == "succeeded", statuses
    events = _events(client, job_id)
    resumed = [i for i, e in enumerate(events) if e["message"] == f"resumed from checkpoint at step {paused_at}"]
    assert resumed, [e["message"] for e in events]
    steps = [e["data"]["step"] for e in events[resumed[0]:] if e["type"] == "metrics" and "train_loss" in e["data"]]
    # metrics are reported every 10 steps of a 120-step run: the resumed run's first report is the
    # next multiple of 10 after the pause (a restart from step 0 would report 10 first)
    assert paused_at < steps[0] <= paused_at + 10 and steps == sorted(set(steps)) and steps[-1] == 120, (paused_at, steps)


def test_a_rank_sweep_reports_the_chapter_table(stack):
    client = stack.tenant("ops-sweep")
    train, valid = _upload(client, "pirate_chat.jsonl", lines=32), _upload(client, "pirate_chat.jsonl", lines=16)
    r = client.post("/v1/fine_tuning/sweeps", json={
        "base": {"model": "lorafleet/tiny-llama", "training_file": train, "validation_file": valid,
                 "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 8,
                                                                         "gradient_accumulation_steps": 1}}}},
        "parameters": [{"name": "r", "values": [2, 4]}]})
    assert r.status_code == 201, r.text
    sweep_id = r.json()["id"]
    _wait(client, [c["job_id"] for c in r.json()["children"]])
    sweep = client.get(f"/v1/fine_tuning/sweeps/{sweep_id}").json()
    assert sweep["status"] == "succeeded", sweep
    rows = {c["values"]["r"]: c for c in sweep["children"]}
    assert rows[4]["trainable_params"] == 2 * rows[2]["trainable_params"] > 0  # A and B grow with r
    for row in rows.values():
        assert row["eval_loss"] > 0 and row["peak_memory_mb"] > 0 and row["tokens_per_s"] > 0 and row["train_time_s"] > 0
    assert sweep["best"]["eval_loss"] == min(row["eval_loss"] for row in rows.values())
