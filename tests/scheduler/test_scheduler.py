"""The scheduler against a real local Ray and both databases.

Runs use a stand-in entrypoint (`sleep`) instead of a training run: these tests are about who
starts when, reconciliation and cancellation, not training (tests/workers/train covers that).
"""

from __future__ import annotations

import shlex
import sys
import time

import pytest
from sqlalchemy import select

from service.db.models import Base, File, Job
from service.db.session import make_engine, make_session_factory, session_scope
from service.catalog.repository import ensure_base_model
from service.ids import new_id, now
from service.jobs import states
from service.jobs.repository import create_job
from service.launcher import RayJobLauncher, RunState, submission_id
from service.scheduler import Scheduler
from service.settings import Settings
from service.tenants.repository import create_tenant

pytestmark = pytest.mark.ray

SLEEP = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(120)'"


@pytest.fixture
def env(database_url, ray_cluster, tmp_path):
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    settings = Settings(data_dir=tmp_path, database_url=database_url, max_running_jobs=1,
                        max_job_attempts=2, ray_address=ray_cluster["dashboard"])
    launcher = RayJobLauncher(ray_cluster["dashboard"], entrypoint=SLEEP)
    sched = Scheduler(settings, engine, launcher)
    submitted: list[str] = []
    yield sched, make_session_factory(engine), launcher, submitted
    sched.lock.release()
    # Stop every run the test left behind, so the shared Ray is free for the next test.
    with session_scope(make_session_factory(engine)) as s:
        for job in s.scalars(select(Job)):
            for attempt in range(1, job.attempts + 1):
                launcher.stop(submission_id(job.id, attempt))
    engine.dispose()


def _tenant(s, name, limit=5):
    return create_tenant(s, name=name, max_concurrent_jobs=limit, max_queued_jobs=100,
                         requests_per_minute=100)


def _queued_job(s, tenant_id):
    ensure_base_model(s, id="m", source_uri="builtin://m", architecture="llama",
                      methods=["lora"], max_rank=64, quantization=None)
    f = File(id=new_id("file-"), tenant_id=tenant_id, filename="d.jsonl", purpose="fine-tune",
             bytes=1, sha256="0" * 64, status="processed", status_details=None, format="text",
             examples=1, object_key=f"tenants/{tenant_id}/files/x.jsonl", created_at=now())
    s.add(f)
    job = create_job(s, tenant_id=tenant_id, model="m", training_file=f.id, validation_file=None,
                     method="lora", hyperparameters={}, resources={"num_workers": 1},
                     suffix=None, seed=1, metadata=None)
    states.transition(s, job, states.QUEUED)
    return job.id


def _running(sessions):
    with session_scope(sessions) as s:
        return [j.id for j in s.scalars(select(Job).where(Job.status == states.RUNNING))]


def _finish(sessions, job_id):
    with session_scope(sessions) as s:
        states.transition(s, s.get(Job, job_id), states.SUCCEEDED)


def test_fairness_capacity_one(env):
    """Tenant A queues 20 jobs, B and C one each, one run at a time: B's and C's start before A's third."""
    sched, sessions, launcher, _ = env
    with session_scope(sessions) as s:
        a, b, c = (_tenant(s, n).id for n in "ABC")
        a_jobs = [_queued_job(s, a) for _ in range(20)]
        b_job, c_job = _queued_job(s, b), _queued_job(s, c)
    started = []
    for _ in range(5):
        assert sched.tick()
        running = _running(sessions)
        assert len(running) == 1, "capacity is one run at a time"
        started.append(running[0])
        assert launcher.state(running[0]) in (RunState.PENDING, RunState.RUNNING)
        _finish(sessions, running[0])
    assert started == [a_jobs[0], b_job, c_job, a_jobs[1], a_jobs[2]]


def test_cancel_stops_the_ray_run_within_10s(env):
    sched, sessions, launcher, _ = env
    with session_scope(sessions) as s:
        job_id = _queued_job(s, _tenant(s, "A").id)
    sched.tick()
    assert _running(sessions) == [job_id]
    _wait(lambda: launcher.state(job_id) is RunState.RUNNING, timeout=120)  # its process is up
    with session_scope(sessions) as s:
        states.transition(s, s.get(Job, job_id), states.CANCELLING)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        sched.tick()
        with session_scope(sessions) as s:
            if s.get(Job, job_id).status == states.CANCELLED:
                break
        time.sleep(0.5)
    with session_scope(sessions) as s:
        assert s.get(Job, job_id).status == states.CANCELLED
    assert launcher.state(job_id) is RunState.STOPPED


def test_reconcile_resubmits_lost_and_retries_crashed_runs(env):
    sched, sessions, launcher, _ = env
    with session_scope(sessions) as s:
        job_id = _queued_job(s, _tenant(s, "A").id)
        # Committed as running, then the scheduler died before submitting: Ray has no record.
        job = s.get(Job, job_id)
        states.transition(s, job, states.RUNNING, attempts=1)
    assert launcher.state(job_id) is RunState.UNKNOWN
    sched.tick()
    assert launcher.state(job_id) in (RunState.PENDING, RunState.RUNNING)
    # Submitting the same job again cannot start a second run.
    launcher.submit(job_id, env={})
    # The run crashes without reporting: requeued, then started as attempt 2 with its own id.
    launcher.stop(job_id)
    _wait(lambda: launcher.state(job_id).terminal)
    sched.tick()
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.attempts) == (states.RUNNING, 2)
    assert launcher.state(submission_id(job_id, 2)) in (RunState.PENDING, RunState.RUNNING)
    # Crashes again at the attempt limit: failed with a platform error code.
    launcher.stop(submission_id(job_id, 2))
    _wait(lambda: launcher.state(submission_id(job_id, 2)).terminal)
    sched.tick()
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.status == states.FAILED and job.error_code == "worker_lost"


def test_only_one_leader(env, database_url, ray_cluster, tmp_path):
    sched, sessions, launcher, _ = env
    assert sched.tick()
    other = Scheduler(sched.settings, make_engine(database_url), launcher)
    assert other.tick() is False
    sched.lock.release()
    assert other.tick() is True
    other.lock.release()


def _wait(cond, timeout=20):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.3)
