"""The scheduler's part of a pause (both databases, the simulated cluster of test_governance): a
pausing job keeps its slot until its run has stopped, then becomes paused and frees it in the same
pass; a resumed job runs again as a new attempt; a run that does not stop within the grace is
stopped. The worker's part is tests/workers/train/test_train_pause.py; all of it on a real Ray,
tests/e2e/test_operations_e2e.py."""

from __future__ import annotations

from sqlalchemy import select
from test_governance import world  # noqa: F401 - the fixture

from service.db.models import Job, JobEventRow
from service.db.session import session_scope
from service.jobs import states
from service.jobs.pause import pause_job, resume_job
from service.launcher import RunState, submission_id
from service.scheduler import PAUSE_GRACE_S


def _do(w, fn, job_id):
    with session_scope(w.sessions) as s:
        fn(s, s.get(Job, job_id))


def test_a_paused_job_frees_its_slot_and_a_resumed_one_runs_again(world):  # noqa: F811
    w = world(duration=lambda _: 10_000.0)
    tenant = w.tenant("a", max_concurrent_jobs=1)
    first, second = w.queue(tenant, 2)
    assert w.tick() == [first]
    _do(w, pause_job, first)
    assert w.tick() == []  # its run has not stopped yet: the job still holds the tenant's slot
    assert (w.job(first).status, w.job(second).status) == (states.PAUSING, states.QUEUED)
    w.cluster.stop(submission_id(first, 1))  # the worker wrote its checkpoint and exited
    assert w.tick() == [second]  # paused, and its slot taken in the same pass
    assert (w.job(first).status, w.job(first).attempts) == (states.PAUSED, 1)
    _do(w, resume_job, first)
    assert w.tick() == [] and w.job(first).status == states.QUEUED  # the one slot is the second's
    w.cluster.stop(submission_id(second, 1))
    _do(w, lambda s, job: states.transition(s, job, states.SUCCEEDED), second)
    assert w.tick() == [first]
    assert (w.job(first).status, w.job(first).attempts) == (states.RUNNING, 2)
    assert w.cluster.state(submission_id(first, 2)) is RunState.RUNNING
    with session_scope(w.sessions) as s:
        messages = [e.message for e in s.scalars(select(JobEventRow).where(JobEventRow.job_id == first))]
    assert "Job paused at step 0" in messages and "Job resumed; requeued, continuing from step 0" in messages


def test_a_run_that_does_not_stop_within_the_grace_is_stopped(world):  # noqa: F811
    w = world(duration=lambda _: 10_000.0)
    (job_id,) = w.queue(w.tenant("a"))
    w.tick()
    _do(w, pause_job, job_id)
    w.tick(advance_s=PAUSE_GRACE_S / 2)
    assert w.job(job_id).status == states.PAUSING
    w.tick(advance_s=PAUSE_GRACE_S)
    assert w.job(job_id).status == states.PAUSED
    assert w.cluster.state(submission_id(job_id, 1)).terminal


def test_resumes_do_not_spend_the_jobs_crash_retries(world):  # noqa: F811
    w = world(duration=lambda _: 10_000.0, max_job_attempts=2)
    (job_id,) = w.queue(w.tenant("a"))
    for run in range(1, 4):  # paused and resumed three times: more runs than max_job_attempts
        assert w.tick() == [job_id]
        _do(w, pause_job, job_id)
        w.cluster.stop(submission_id(job_id, run))
        w.tick()
        assert w.job(job_id).status == states.PAUSED
        _do(w, resume_job, job_id)
    assert w.tick() == [job_id]
    assert (w.job(job_id).attempts, w.job(job_id).paused_runs) == (4, 3)
    w.cluster.stop(submission_id(job_id, 4))  # the run crashes: its first crash, so requeued
    w.tick()
    assert w.job(job_id).status in (states.QUEUED, states.RUNNING)
    if w.job(job_id).status == states.QUEUED:
        w.tick()
    assert w.job(job_id).attempts == 5
    w.cluster.stop(submission_id(job_id, 5))  # the second crash: max_job_attempts reached
    w.tick()
    failed = w.job(job_id)
    assert (failed.status, failed.error_code) == (states.FAILED, "worker_lost")
    assert "2 times" in failed.error_message
