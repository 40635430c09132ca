"""Job tokens are per run (attempt), expire, and are refused once their run is over.

A worker's token rides in its Ray Job's spec, readable by anyone holding the Ray token: what it
is worth must end with its run. These drive the internal routes with real tokens against real
jobs on both databases: the current run is accepted; an expired token, another run's token, a
token of the old format or of another job, and any token once the job ended are refused, for
every route a worker writes through (events included).
"""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
import sqlalchemy as sa
from api_helpers import assert_problem, create_job, job_row, publish_adapter, running_job, uploaded_file

from service.db.models import Job, Tenant
from service.jobs import states
from service.jobs.naming import checkpoint_prefix
from service.jobs.public_errors import public_failure_message
from service.scheduler import build_spec
from service.security import JOB_TOKEN_SLACK_S, job_token, job_token_claims
from service.settings import Settings

CURRENT_ATTEMPT = 2


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def run(client, app, tenant):
    """A job in its second run (as after one crashed run), and that run's token."""
    return running_job(client, app, tenant, CURRENT_ATTEMPT)


def _writes(app, job_id: str) -> dict[str, dict]:
    """A valid body for each route a worker writes through."""
    prefix = checkpoint_prefix(job_row(app, job_id))
    return {
        "events": {"events": [{"message": "step 1"}]},
        "checkpoints": {"step": 1, "key_prefix": f"{prefix}/step-000001", "metrics": {}},
        "result": {"manifest_key": f"{prefix}/manifest.json"},
        "failure": {"code": "internal_error", "message": "x"},
    }


def _assert_all_refused(client, app, job_id, headers, status, code):
    for route, body in _writes(app, job_id).items():
        r = client.post(f"/internal/v1/jobs/{job_id}/{route}", json=body, headers=headers)
        assert_problem(r, status, code)
        assert r.status_code == status, route


def test_claims_round_trip_and_signature():
    settings = Settings(internal_secret="s1")
    before = int(time.time())
    claims = job_token_claims(job_token("ftjob-abc", 3, settings, ttl_s=600), settings)
    assert (claims.job_id, claims.attempt) == ("ftjob-abc", 3)
    assert before + 600 <= claims.expires_at <= int(time.time()) + 600
    assert job_token_claims(job_token("ftjob-abc", 3, settings, ttl_s=600), Settings(internal_secret="s2")) is None
    token = job_token("ftjob-abc", 3, settings, ttl_s=600)
    body, _, mac = token.rpartition(".")
    forged = body.replace(".3.", ".4.") + "." + mac  # another attempt under the same signature
    assert job_token_claims(forged, settings) is None
    assert job_token_claims("", settings) is None and job_token_claims("v2....", settings) is None


def test_the_current_run_is_accepted(client, app, tenant, run):
    job_id, token = run
    r = client.post(f"/internal/v1/jobs/{job_id}/events", json={"events": [{"message": "step 1"}]},
                    headers=_bearer(token))
    assert r.status_code == 204, r.text
    body = _writes(app, job_id)["checkpoints"]
    assert client.post(f"/internal/v1/jobs/{job_id}/checkpoints", json=body, headers=_bearer(token)).status_code == 201
    assert client.get(f"/internal/v1/jobs/{job_id}/status", headers=_bearer(token)).json() == {"status": "running"}
    key = publish_adapter(app, job_id)
    r = client.post(f"/internal/v1/jobs/{job_id}/result", json={"manifest_key": key}, headers=_bearer(token))
    assert r.status_code == 200, r.text
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()["status"] == "succeeded"


def test_an_expired_token_is_refused(client, app, run):
    job_id, _ = run
    expiring = job_token(job_id, CURRENT_ATTEMPT, app.state.settings, ttl_s=1)
    time.sleep(1.1)
    _assert_all_refused(client, app, job_id, _bearer(expiring), 401, "unauthorized")
    assert_problem(client.get(f"/internal/v1/jobs/{job_id}/status", headers=_bearer(expiring)), 401, "unauthorized")
    assert job_row(app, job_id).status == "running"


@pytest.mark.parametrize("attempt", [CURRENT_ATTEMPT - 1, CURRENT_ATTEMPT + 1, 0])
def test_another_runs_token_is_refused(client, app, tenant, run, attempt):
    job_id, _ = run
    other = _bearer(job_token(job_id, attempt, app.state.settings, ttl_s=3600))
    _assert_all_refused(client, app, job_id, other, 409, "run_over")
    assert_problem(client.get(f"/internal/v1/jobs/{job_id}/status", headers=other), 409, "run_over")
    assert job_row(app, job_id).status == "running"
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers).json()["data"]
    assert "step 1" not in [e["message"] for e in events]


@pytest.mark.parametrize("end", [states.SUCCEEDED, states.FAILED, states.CANCELLED])
def test_every_write_is_refused_once_the_job_ended(client, app, tenant, run, end):
    job_id, token = run
    with app.state.session_factory() as s:
        job = s.get(Job, job_id)
        if end == states.CANCELLED:
            states.transition(s, job, states.CANCELLING)
        states.transition(s, job, end)
        s.commit()
    _assert_all_refused(client, app, job_id, _bearer(token), 409, "run_over")
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers).json()["data"]
    assert "step 1" not in [e["message"] for e in events]
    assert job_row(app, job_id).status == end
    # The run may still read the status: that is how its worker learns it was cancelled.
    assert client.get(f"/internal/v1/jobs/{job_id}/status", headers=_bearer(token)).json() == {"status": end}


def test_a_requeued_jobs_run_is_over(client, app, run):
    job_id, token = run
    with app.state.session_factory() as s:
        states.transition(s, s.get(Job, job_id), states.QUEUED)
        s.commit()
    _assert_all_refused(client, app, job_id, _bearer(token), 409, "run_over")
    assert job_row(app, job_id).status == "queued"


def test_old_format_foreign_and_garbled_tokens_are_refused(client, app, run, other_tenant):
    job_id, _ = run
    secret = app.state.settings.internal_secret.get_secret_value().encode()
    old = hmac.new(secret, job_id.encode(), hashlib.sha256).hexdigest()  # the v1 token: HMAC(job id)
    other_job = create_job(client, other_tenant, uploaded_file(client, other_tenant)).json()["id"]
    foreign = job_token(other_job, CURRENT_ATTEMPT, app.state.settings, ttl_s=3600)
    unsigned = job_token(job_id, CURRENT_ATTEMPT, Settings(internal_secret="not ours"), ttl_s=3600)
    for token in (old, foreign, unsigned, "v2." + job_id + ".2.9999999999.00"):
        _assert_all_refused(client, app, job_id, _bearer(token), 401, "unauthorized")
    assert job_row(app, job_id).status == "running"


def test_platform_failure_text_stays_in_our_logs(client, app, tenant, run, caplog):
    """A worker reporting Ray's or boto's exception text: the tenant reads our words only."""
    job_id, token = run
    raw = ('training workers failed 3 times: RayTaskError(OSError): ray::_RayTrainWorker__execute() '
           '(pid=4242, ip=10.0.3.7)\n  File "/home/ray/anaconda3/lib/python3.11/site-packages/ray/train/'
           '_internal/worker_group.py", line 33\nOSError: [Errno 28] No space left on device: '
           "'/tmp/ray/session_2026/artifacts/ftjob'")
    with caplog.at_level("WARNING", logger="lorafleet.jobs"):
        r = client.post(f"/internal/v1/jobs/{job_id}/failure", headers=_bearer(token),
                        json={"code": "worker_lost", "message": raw})
    assert r.status_code == 204, r.text
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()
    assert job["error"] == {"code": "worker_lost", "message": public_failure_message("worker_lost"), "param": None}
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers).text
    for leak in ("/home/ray", "10.0.3.7", "Errno", "RayTaskError", "Traceback", "File \""):
        assert leak not in job["error"]["message"] and leak not in events
    assert any(job_id in rec.getMessage() and "/home/ray" in rec.getMessage() for rec in caplog.records)


def test_tenant_failure_text_is_kept(client, tenant, run):
    job_id, token = run
    r = client.post(f"/internal/v1/jobs/{job_id}/failure", headers=_bearer(token),
                    json={"code": "invalid_training_file", "message": "line 3: messages is empty"})
    assert r.status_code == 204
    error = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).json()["error"]
    assert error["message"] == "line 3: messages is empty"


@pytest.fixture
def run_over_after_check(app, monkeypatch):
    """``arm(job_id, change)``: right after the token dependency's read of the job (the run
    still current), the job changes as the scheduler would change it in that window."""
    armed: dict[str, dict] = {}
    read = app.state.read_db.run

    async def read_then_change(fn, /, **kwargs):
        result = await read(fn, **kwargs)
        change = armed.pop(kwargs.get("job_id"), None)
        if fn.__name__ == "_run_of" and change is not None:
            with app.state.session_factory() as s:
                s.execute(sa.update(Job).where(Job.id == kwargs["job_id"]).values(**change))
                s.commit()
        return result

    monkeypatch.setattr(app.state.read_db, "run", read_then_change)
    return armed.__setitem__


@pytest.mark.parametrize("change", ["requeued", "replaced"])
@pytest.mark.parametrize("route", ["events", "checkpoints", "result", "failure"])
def test_a_run_that_ends_between_check_and_write_writes_nothing(client, app, tenant, run,
                                                                 run_over_after_check, route, change):
    job_id, token = run
    values = {"status": states.QUEUED} if change == "requeued" else {"attempts": CURRENT_ATTEMPT + 1}
    body = _writes(app, job_id)[route]
    if route == "result":
        body = {"manifest_key": publish_adapter(app, job_id)}
    before = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers).json()["data"]
    run_over_after_check(job_id, values)
    r = client.post(f"/internal/v1/jobs/{job_id}/{route}", json=body, headers=_bearer(token))
    assert_problem(r, 409, "run_over")
    job = job_row(app, job_id)
    assert (job.status, job.attempts) == (values.get("status", states.RUNNING), values.get("attempts", CURRENT_ATTEMPT))
    assert job.fine_tuned_model is None and job.error_code is None
    after = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=tenant.headers).json()["data"]
    assert after == before
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert checkpoints == []


def test_a_token_lives_no_longer_than_its_runs_wall_clock_limit_and_slack():
    settings = Settings(internal_secret="s1")
    for wall_clock_s, expected in [(600, 600 + JOB_TOKEN_SLACK_S), (None, 7 * 86400), (30 * 86400, 7 * 86400)]:
        before = int(time.time())
        token = job_token("ftjob-abc", 1, settings, ttl_s=7 * 86400, wall_clock_s=wall_clock_s)
        assert before + expected <= job_token_claims(token, settings).expires_at <= int(time.time()) + expected


@pytest.mark.parametrize(("tenant_limit", "service_limit", "expected"), [
    (1200, 86400, 1200 + JOB_TOKEN_SLACK_S),  # the tenant's own limit wins
    (None, 7200, 7200 + JOB_TOKEN_SLACK_S),  # else the service's
    (None, None, 7 * 86400),  # no limit at all: the token's own ttl
])
def test_the_schedulers_spec_carries_a_token_bounded_by_the_wall_clock_limit(
        client, app, tenant, tenant_limit, service_limit, expected):
    job_id = create_job(client, tenant, uploaded_file(client, tenant)).json()["id"]
    settings = app.state.settings.model_copy(update={"max_job_wall_clock_s": service_limit,
                                                     "job_token_ttl_s": 7 * 86400})
    with app.state.session_factory() as s:
        s.get(Tenant, tenant.id).max_job_wall_clock_s = tenant_limit
        job = s.get(Job, job_id)
        states.transition(s, job, states.RUNNING, attempts=1)
        s.commit()
        before = int(time.time())
        spec = build_spec(s, job, settings)
    claims = job_token_claims(spec.job_token, settings)
    assert (claims.job_id, claims.attempt) == (job_id, 1)
    assert before + expected <= claims.expires_at <= int(time.time()) + expected
