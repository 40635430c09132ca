"""Fine-tuning jobs: defaults, validation of every input, quotas, paging, cancel, state machine."""

from __future__ import annotations

import pytest
from api_helpers import assert_problem, create_job, new_tenant, uploaded_file
from sqlalchemy import update

from service.db.models import File, Job
from service.jobs import states

# n_epochs, batch_size and the learning rate are `auto` by default: chosen from the training file
# (tests/service/test_auto_hyperparameters.py).
CHAPTER_DEFAULTS = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def test_create_with_defaults_goes_through_validation_to_queued(client, tenant):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, suffix="pirate", metadata={"team": "a"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-") and job["status"] == "queued"
    assert job["organization_id"] == tenant.id and job["user_provided_suffix"] == "pirate"
    assert job["method"]["type"] == "lora" and job["metadata"] == {"team": "a"}
    hp = job["method"]["lora"]["hyperparameters"]
    assert {k: hp[k] for k in CHAPTER_DEFAULTS} == CHAPTER_DEFAULTS
    # 3 examples: the most epochs `auto` gives, one example a micro-batch, 25 steps: 10x the rate
    assert job["hyperparameters"] == {"n_epochs": 25, "batch_size": 1, "learning_rate_multiplier": 10.0}
    assert job["auto_hyperparameters"] == ["batch_size", "learning_rate_multiplier", "n_epochs"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?order=asc", headers=tenant.headers).json()
    assert [e["data"]["to"] for e in events["data"] if e["type"] == "status"] == ["validating_files", "queued"]


def test_qlora_with_hyperparameters_and_openai_fields(client, tenant):
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, seed=7, hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 2},
                   method={"type": "qlora", "qlora": {"hyperparameters": {"r": 16, "target_modules": "all-linear"}}})
    assert r.status_code == 201, r.text
    hp = r.json()["method"]["qlora"]["hyperparameters"]
    assert (hp["r"], hp["lora_alpha"], hp["n_epochs"], hp["seed"]) == (16, 32.0, 2, 7)
    assert hp["learning_rate"] == pytest.approx(4e-4) and hp["target_modules"] == "all-linear"
    assert r.json()["method"]["type"] == "qlora"


@pytest.mark.parametrize("body,status,code,param", [
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"r": 0}}}}, 422, "validation_error",
     "method.lora.hyperparameters.r"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"r": 128}}}}, 422, "invalid_hyperparameters",
     "method.lora.hyperparameters.r"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"learning_rate": 0}}}}, 422, "validation_error",
     "method.lora.hyperparameters.learning_rate"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"learning_rate": -1e-4}}}}, 422,
     "validation_error", "method.lora.hyperparameters.learning_rate"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"rank": 8}}}}, 422, "validation_error",
     "method.lora.hyperparameters.rank"),
    ({"method": {"type": "lora", "qlora": {}}}, 422, "validation_error", "method"),
    ({"method": {"type": "dpo"}}, 422, "validation_error", "method.type"),
    ({"model": "nobody/unknown"}, 404, "model_not_found", "model"),
    ({"training_file": "file-doesnotexist"}, 404, "not_found", "training_file"),
    ({"validation_file": "file-doesnotexist"}, 404, "not_found", "validation_file"),
    ({"unknown_field": 1}, 422, "validation_error", "unknown_field"),
    ({"suffix": "has/slash"}, 422, "validation_error", "suffix"),
    ({"seed": "x"}, 422, "validation_error", "seed"),
    # Valid alone, invalid together: the rate the multiplier gives underflows to 0 (found by fuzzing).
    ({"hyperparameters": {"learning_rate_multiplier": 1e-320}}, 422, "validation_error",
     "hyperparameters.learning_rate"),
])
def test_bad_job_requests_change_nothing(client, app, body, status, code, param):
    t = new_tenant(client)
    file_id = uploaded_file(client, t)
    assert_problem(create_job(client, t, file_id, **body), status, code, param)
    assert client.get("/v1/fine_tuning/jobs", headers=t.headers).json()["data"] == []


def test_method_not_allowed_by_the_base_model(client, tenant):
    from api_helpers import ADMIN

    client.post("/v1/admin/models", json={"id": "acme/lora-only", "source_uri": "s3://m/x",
                                          "methods": ["lora"], "max_rank": 8}, headers=ADMIN)
    file_id = uploaded_file(client, tenant)
    r = create_job(client, tenant, file_id, model="acme/lora-only", method={"type": "qlora"})
    assert_problem(r, 422, "validation_error", "method.type")


def test_other_tenants_file_and_unusable_files(client, app, tenant, other_tenant):
    theirs = uploaded_file(client, other_tenant)
    assert_problem(create_job(client, tenant, theirs), 404, "not_found", "training_file")
    mine = uploaded_file(client, tenant)
    with app.state.session_factory() as s:  # a file that is not (or no longer) processed
        s.execute(update(File).where(File.id == mine).values(status="error"))
        s.commit()
    assert_problem(create_job(client, tenant, mine), 422, "file_not_ready", "training_file")


def test_queue_quota_is_a_429(client):
    t = new_tenant(client, max_queued_jobs=2)
    file_id = uploaded_file(client, t)
    for _ in range(2):
        assert create_job(client, t, file_id).status_code == 201
    r = create_job(client, t, file_id)
    assert_problem(r, 429, "quota_exceeded")
    assert int(r.headers["retry-after"]) > 0
    assert len(client.get("/v1/fine_tuning/jobs", headers=t.headers).json()["data"]) == 2


def test_list_pages_with_cursor_and_status_filter(client):
    t = new_tenant(client)
    file_id = uploaded_file(client, t)
    ids = [create_job(client, t, file_id).json()["id"] for _ in range(3)]
    client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel", headers=t.headers)
    first = client.get("/v1/fine_tuning/jobs?limit=2", headers=t.headers).json()
    assert [j["id"] for j in first["data"]] == [ids[2], ids[1]] and first["has_more"]
    second = client.get(f"/v1/fine_tuning/jobs?limit=2&after={first['last_id']}", headers=t.headers).json()
    assert [j["id"] for j in second["data"]] == [ids[0]] and not second["has_more"]
    cancelled = client.get("/v1/fine_tuning/jobs?status=cancelled", headers=t.headers).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    assert_problem(client.get("/v1/fine_tuning/jobs?status=bogus", headers=t.headers), 422,
                   "validation_error", "status")
    assert_problem(client.get("/v1/fine_tuning/jobs?limit=0", headers=t.headers), 422,
                   "validation_error", "limit")


def test_cancel_queued_running_and_terminal(client, app, tenant):
    file_id = uploaded_file(client, tenant)
    queued = create_job(client, tenant, file_id).json()["id"]
    r = client.post(f"/v1/fine_tuning/jobs/{queued}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert_problem(client.post(f"/v1/fine_tuning/jobs/{queued}/cancel", headers=tenant.headers),
                   409, "invalid_transition")

    running = create_job(client, tenant, file_id).json()["id"]
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, running), states.RUNNING)
        s.commit()
    r = client.post(f"/v1/fine_tuning/jobs/{running}/cancel", headers=tenant.headers)
    assert r.json()["status"] == "cancelling"  # the scheduler stops the Ray job, then cancelled
    r = client.post(f"/v1/fine_tuning/jobs/{running}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelling"


def test_events_page_both_orders(client, tenant):
    file_id = uploaded_file(client, tenant)
    job = create_job(client, tenant, file_id).json()["id"]
    client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=tenant.headers)
    url = f"/v1/fine_tuning/jobs/{job}/events"
    asc = client.get(url + "?order=asc&limit=2", headers=tenant.headers).json()
    rest = client.get(url + f"?order=asc&after={asc['last_id']}", headers=tenant.headers).json()
    seen = [e["data"]["to"] for e in asc["data"] + rest["data"] if e["type"] == "status"]
    assert seen == ["validating_files", "queued", "cancelled"] and asc["has_more"]
    desc = client.get(url, headers=tenant.headers).json()
    assert [e["data"]["to"] for e in desc["data"] if e["type"] == "status"] == seen[::-1]
    assert_problem(client.get(url + "?after=garbage", headers=tenant.headers), 422, "validation_error", "after")
