"""Worker → control plane routes with a job token: events, checkpoints, result commit, failure."""

from __future__ import annotations

import pytest
from api_helpers import assert_problem, create_job, job_row, publish_adapter, running_job, uploaded_file
from sqlalchemy import func, select

from service.db.models import Adapter, Job
from service.jobs import states
from service.jobs.naming import adapter_prefix, checkpoint_prefix
from service.security import job_token


@pytest.fixture
def running(client, app, tenant):
    """A running job of ``tenant`` and the headers its worker uses."""
    job_id, token = running_job(client, app, tenant, suffix="Pirate_Talk")
    return job_id, {"Authorization": f"Bearer {token}"}


def worker_token(app, job_id: str, attempt: int = 0, ttl_s: int = 3600) -> str:
    # attempt 0: the fixture moves the job to running itself, without the scheduler counting a run
    return job_token(job_id, attempt, app.state.settings, ttl_s=ttl_s)


def test_events_and_metrics_reach_the_tenant(client, tenant, running):
    job_id, worker = running
    events = [{"message": "step 1", "type": "metrics",
               "data": {"step": 1, "total_steps": 10, "train_loss": 2.5, "learning_rate": 2e-4,
                        "tokens_per_s": 900.0, "eta_s": 60}},
              {"level": "warn", "message": "slow", "type": "warning"}]
    r = client.post(f"/internal/v1/jobs/{job_id}/events", json={"events": events}, headers=worker)
    assert r.status_code == 204
    got = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=2", headers=tenant.headers).json()["data"]
    assert [e["message"] for e in got] == ["slow", "step 1"]
    assert got[1]["data"]["train_loss"] == 2.5 and got[0]["level"] == "warn"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["estimated_finish"] >= job["created_at"] + 60
    bad = {"events": [{"message": "x", "level": "fatal"}]}
    assert_problem(client.post(f"/internal/v1/jobs/{job_id}/events", json=bad, headers=worker),
                   422, "validation_error", "events.0.level")


def test_checkpoints(client, app, tenant, running):
    job_id, worker = running
    prefix = checkpoint_prefix(job_row(app, job_id), 10)
    r = client.post(f"/internal/v1/jobs/{job_id}/checkpoints", headers=worker,
                    json={"step": 10, "key_prefix": prefix, "metrics": {"train_loss": 1.5}})
    assert r.status_code == 201 and r.json()["step_number"] == 10
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=tenant.headers).json()
    assert [(c["step_number"], c["fine_tuned_model_checkpoint"]) for c in page["data"]] == [(10, prefix)]
    outside = {"step": 11, "key_prefix": "tenants/someone-else/x", "metrics": {}}
    assert_problem(client.post(f"/internal/v1/jobs/{job_id}/checkpoints", json=outside, headers=worker),
                   422, "validation_error", "key_prefix")


def test_wrong_or_missing_token(client, app, running, other_tenant):
    job_id, worker = running
    other_job = create_job(client, other_tenant, uploaded_file(client, other_tenant)).json()["id"]
    wrong = {"Authorization": f"Bearer {worker_token(app, other_job)}"}
    for headers in ({}, wrong, {"Authorization": "Bearer nope"}):
        assert_problem(client.get(f"/internal/v1/jobs/{job_id}/status", headers=headers), 401, "unauthorized")
    assert client.get(f"/internal/v1/jobs/{job_id}/status", headers=worker).json() == {"status": "running"}


def test_result_commits_adapter_and_succeeded_together(client, app, tenant, running):
    job_id, worker = running
    key = publish_adapter(app, job_id)
    r = client.post(f"/internal/v1/jobs/{job_id}/result", headers=worker,
                    json={"manifest_key": key, "metrics": {"trained_tokens": 1234, "train_loss": 0.5}})
    assert r.status_code == 200, r.text
    adapter_id = r.json()["adapter_id"]
    assert adapter_id.startswith("ft-tiny-llama-pirate-talk-") and len(adapter_id.rsplit("-", 1)[1]) == 16
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert (job["status"], job["fine_tuned_model"], job["trained_tokens"]) == ("succeeded", adapter_id, 1234)

    adapter = client.get(f"/v1/adapters/{adapter_id}", headers=tenant.headers).json()
    assert {f["name"] for f in adapter["files"]} == {"adapter_model.safetensors", "adapter_config.json",
                                                     "manifest.json"}
    data = client.get(f"/v1/adapters/{adapter_id}/files/adapter_config.json", headers=tenant.headers)
    assert data.content == b'{"r": 8}'
    assert_problem(client.get(f"/v1/adapters/{adapter_id}/files/..%2Fsecret", headers=tenant.headers),
                   404, "not_found")
    models = [m["id"] for m in client.get("/v1/models", headers=tenant.headers).json()["data"]]
    assert adapter_id in models and "lorafleet/tiny-llama" in models
    # a second report for a finished job is a conflict, not a second adapter
    assert_problem(client.post(f"/internal/v1/jobs/{job_id}/result", headers=worker,
                               json={"manifest_key": key}), 409, "run_over")

    r = client.delete(f"/v1/models/{adapter_id}", headers=tenant.headers)
    assert r.json()["deleted"] is True
    assert app.state.store.list(adapter_prefix(job_row(app, job_id)) + "/") == []
    assert_problem(client.get(f"/v1/models/{adapter_id}", headers=tenant.headers), 404, "model_not_found")


def test_tampered_adapter_fails_the_job_and_publishes_nothing(client, app, tenant, running):
    job_id, worker = running
    key = publish_adapter(app, job_id, tamper=True)
    r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key}, headers=worker)
    assert_problem(r, 422, "storage_error", "manifest_key")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "storage_error"
    assert "checksum" in job["error"]["message"] and job["fine_tuned_model"] is None
    with app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Adapter).where(Adapter.job_id == job_id)) == 0


@pytest.mark.parametrize("change,reason", [
    ({"drop": "adapter_model.safetensors"}, "lists no adapter_model.safetensors"),
    ({"method": "qlora"}, "another base model or method"),
    ({"extra_name": "../escape"}, "is invalid"),
])
def test_incomplete_or_mismatched_manifest_fails_the_job(client, app, tenant, running, change, reason):
    job_id, worker = running
    key = publish_adapter(app, job_id, **change)
    r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key}, headers=worker)
    assert_problem(r, 422, "storage_error", "manifest_key")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and reason in job["error"]["message"], job["error"]


def test_a_stale_run_cannot_fail_or_checkpoint_a_requeued_job(client, app, tenant, running):
    job_id, worker = running
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.QUEUED)
        s.commit()
    r = client.post(f"/internal/v1/jobs/{job_id}/failure", headers=worker,
                    json={"code": "internal_error", "message": "old run"})
    assert_problem(r, 409, "run_over")
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()["status"] == "queued"


def test_manifest_outside_the_jobs_prefix_is_rejected(client, app, tenant, running):
    job_id, worker = running
    r = client.post(f"/internal/v1/jobs/{job_id}/result", headers=worker,
                    json={"manifest_key": f"tenants/{tenant.id}/adapters/other/v1/manifest.json"})
    assert_problem(r, 422, "storage_error")
    assert job_row(app, job_id).status == "failed"


def test_failure_report(client, tenant, running):
    job_id, worker = running
    assert_problem(client.post(f"/internal/v1/jobs/{job_id}/failure", headers=worker,
                               json={"code": "made_up", "message": "x"}), 422, "validation_error", "code")
    r = client.post(f"/internal/v1/jobs/{job_id}/failure", headers=worker,
                    json={"code": "training_diverged", "message": "loss is NaN at step 3", "param": "learning_rate"})
    assert r.status_code == 204
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "training_diverged", "message": "loss is NaN at step 3", "param": "learning_rate"}
    # the run is over: a second report is refused
    assert_problem(client.post(f"/internal/v1/jobs/{job_id}/failure", headers=worker,
                               json={"code": "worker_lost", "message": "x"}), 409, "run_over")
