"""POST /v1/fine_tuning/jobs/{id}/pause and /resume through the API (both databases): the
statuses and events, what may be paused or resumed (409 otherwise), tenant isolation, the
worker's view of a pause (status poll, its checkpoint still taken) and the quotas a paused job
no longer counts against. The scheduler's part (pausing → paused when the run stopped) is in
tests/scheduler/test_scheduler_pause.py; the train loop's (checkpoint, same result) in
tests/workers/train/test_train_pause.py."""

from __future__ import annotations

import sqlalchemy as sa
from api_helpers import assert_problem, create_job, job_row, new_tenant, running_job, uploaded_file

from service.db.models import Job
from service.jobs import states
from workers.train.report import HttpReporter


def _pause(client, tenant, job_id):
    return client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=tenant.headers)


def _resume(client, tenant, job_id):
    return client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=tenant.headers)


def _events(client, tenant, job_id) -> list[dict]:
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers,
                   params={"order": "asc", "limit": 100})
    return r.json()["data"]


def _set(app, job_id: str, **values) -> None:
    with app.state.session_factory() as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def test_pause_then_resume_a_running_job(client, app, tenant):
    job_id, token = running_job(client, app, tenant, 1)
    worker = {"Authorization": f"Bearer {token}"}
    r = _pause(client, tenant, job_id)
    assert r.status_code == 200 and r.json()["status"] == "pausing", r.text
    assert _pause(client, tenant, job_id).json()["status"] == "pausing"  # a retried request
    # The run sees the pause and still reports the checkpoint it writes at it.
    assert client.get(f"/internal/v1/jobs/{job_id}/status", headers=worker).json() == {"status": "pausing"}
    r = client.post(f"/internal/v1/jobs/{job_id}/checkpoints", headers=worker, json={
        "step": 7, "key_prefix": f"tenants/{tenant.id}/jobs/{job_id}/checkpoints/step-000007", "metrics": {}})
    assert r.status_code == 201, r.text
    assert_problem(_resume(client, tenant, job_id), 409, "job_not_resumable", "fine_tuning_job_id")
    with app.state.session_factory() as s:  # what the scheduler does once the run stopped
        states.transition(s, s.get(Job, job_id), states.PAUSED, message="Job paused at step 7")
        s.commit()
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()["status"] == "paused"
    # paused: the old run's token writes nothing more
    r = client.post(f"/internal/v1/jobs/{job_id}/events", headers=worker, json={"events": [{"message": "x"}]})
    assert_problem(r, 409, "run_over")
    r = _resume(client, tenant, job_id)
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    moves = [(e["data"]["from"], e["data"]["to"]) for e in _events(client, tenant, job_id) if e["type"] == "status"]
    assert moves[-4:] == [("queued", "running"), ("running", "pausing"), ("pausing", "paused"), ("paused", "queued")]
    assert "continuing from step 7" in _events(client, tenant, job_id)[-1]["message"]
    assert job_row(app, job_id).last_checkpoint_step == 7


def test_only_a_running_job_pauses_and_only_a_paused_one_resumes(client, app, tenant):
    queued = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    assert_problem(_pause(client, tenant, queued), 409, "job_not_pausable", "fine_tuning_job_id")
    assert_problem(_resume(client, tenant, queued), 409, "job_not_resumable", "fine_tuning_job_id")
    assert job_row(app, queued).status == "queued"  # changed nothing
    for finished in ("succeeded", "failed", "cancelled", "cancelling"):
        job_id, _ = running_job(client, app, tenant)
        _set(app, job_id, status=finished)
        body = assert_problem(_pause(client, tenant, job_id), 409, "job_not_pausable")
        assert repr(finished) in body["detail"]
        assert job_row(app, job_id).status == finished


def test_another_tenants_job_is_not_found(client, app, tenant, other_tenant):
    job_id, _ = running_job(client, app, tenant)
    assert_problem(_pause(client, other_tenant, job_id), 404, "not_found", "fine_tuning_job_id")
    assert_problem(_pause(client, tenant, "ftjob-missing"), 404, "not_found", "fine_tuning_job_id")
    assert job_row(app, job_id).status == "running"
    _set(app, job_id, status=states.PAUSED)
    assert_problem(_resume(client, other_tenant, job_id), 404, "not_found", "fine_tuning_job_id")
    assert job_row(app, job_id).status == "paused"


def test_a_paused_job_can_be_cancelled_and_a_pausing_one_is_stopped(client, app, tenant):
    paused, _ = running_job(client, app, tenant)
    _set(app, paused, status=states.PAUSED)
    r = client.post(f"/v1/fine_tuning/jobs/{paused}/cancel", headers=tenant.headers)
    assert r.json()["status"] == "cancelled", r.text  # no run to stop
    pausing, _ = running_job(client, app, tenant)
    _pause(client, tenant, pausing)
    r = client.post(f"/v1/fine_tuning/jobs/{pausing}/cancel", headers=tenant.headers)
    assert r.json()["status"] == "cancelling", r.text  # the scheduler stops its run


def test_paused_jobs_count_against_neither_quota(client, app):
    tenant = new_tenant(client, max_queued_jobs=1, max_concurrent_jobs=1)
    paused, _ = running_job(client, app, tenant)
    _pause(client, tenant, paused)
    _set(app, paused, status=states.PAUSED)
    # its queue slot is free: one job queues (and the one after it is over the quota)
    assert create_job(client, tenant, uploaded_file(client, tenant)).status_code == 201
    assert_problem(create_job(client, tenant, uploaded_file(client, tenant)), 429, "quota_exceeded")
    # resuming takes a queue slot like any queued job: refused while the queue is full
    assert_problem(_resume(client, tenant, paused), 429, "quota_exceeded")
    assert job_row(app, paused).status == "paused"
    with app.state.session_factory() as s:
        from service.jobs.repository import count_jobs
        assert count_jobs(s, tenant_id=tenant.id, statuses=states.ACTIVE | states.PENDING) == 1


def test_the_worker_reporter_tells_a_pause_from_a_cancel(live_url, client, app, tenant):
    job_id, token = running_job(client, app, tenant, 1)
    reporter = HttpReporter(live_url, job_id, token, flush_interval=60, status_interval=0, attempts=1)
    try:
        assert (reporter.should_stop(), reporter.pause_requested()) == (False, False)
        _pause(client, tenant, job_id)
        assert (reporter.should_stop(), reporter.pause_requested()) == (True, True)
    finally:
        reporter.close()
    other, token = running_job(client, app, tenant, 1)
    reporter = HttpReporter(live_url, other, token, flush_interval=60, status_interval=0, attempts=1)
    try:
        client.post(f"/v1/fine_tuning/jobs/{other}/cancel", headers=tenant.headers)
        assert (reporter.should_stop(), reporter.pause_requested()) == (True, False)
    finally:
        reporter.close()
