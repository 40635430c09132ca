"""Pausing against a real local Ray (both databases): a pausing job keeps its slot until its run
has stopped, then becomes paused and frees it; a resumed job runs again as a new attempt; a run
that does not stop within the grace is stopped. Runs are `sleep` stand-ins, as in
test_scheduler.py: the worker's side of a pause is tests/workers/train/test_train_pause.py."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from test_scheduler import _queued_job, _running, _tenant, _wait, env  # noqa: F401 - env is a fixture

from service import scheduler as scheduler_module
from service.db.models import Job, JobEventRow
from service.db.session import session_scope
from service.jobs import states
from service.jobs.pause import pause_job, resume_job
from service.launcher import RunState, submission_id

pytestmark = pytest.mark.ray


def _status(sessions, job_id):
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        return job.status, job.attempts


def test_a_paused_job_frees_its_slot_and_a_resumed_one_runs_again(env):  # noqa: F811
    sched, sessions, launcher, _ = env  # max_running_jobs=1
    with session_scope(sessions) as s:
        tenant = _tenant(s, "A", limit=1).id
        first, second = _queued_job(s, tenant), _queued_job(s, tenant)
    sched.tick()
    assert _running(sessions) == [first]
    with session_scope(sessions) as s:
        pause_job(s, s.get(Job, first))
    sched.tick()  # the run has not stopped yet: the job holds its slot
    assert _status(sessions, first) == (states.PAUSING, 1) and _status(sessions, second)[0] == states.QUEUED
    # The worker checkpoints and exits (the `sleep` stand-in is stopped instead).
    launcher.stop(submission_id(first, 1))
    _wait(lambda: launcher.state(submission_id(first, 1)).terminal)
    sched.tick()
    assert _status(sessions, first) == (states.PAUSED, 1)
    assert _running(sessions) == [second]  # started in the same pass: a paused job holds nothing
    with session_scope(sessions) as s:
        resume_job(s, s.get(Job, first))
    sched.tick()
    assert _status(sessions, first) == (states.QUEUED, 1)  # the tenant's one slot is taken
    with session_scope(sessions) as s:
        states.transition(s, s.get(Job, second), states.SUCCEEDED)
    sched.tick()
    assert _status(sessions, first) == (states.RUNNING, 2)
    assert launcher.state(submission_id(first, 2)) in (RunState.PENDING, RunState.RUNNING)
    with session_scope(sessions) as s:
        messages = [e.message for e in s.scalars(select(JobEventRow).where(JobEventRow.job_id == first))]
    assert "Job paused at step 0" in messages


def test_a_run_that_does_not_stop_within_the_grace_is_stopped(env, monkeypatch):  # noqa: F811
    sched, sessions, launcher, _ = env
    with session_scope(sessions) as s:
        job_id = _queued_job(s, _tenant(s, "A").id)
    sched.tick()
    _wait(lambda: launcher.state(job_id) is RunState.RUNNING, timeout=120)
    with session_scope(sessions) as s:
        pause_job(s, s.get(Job, job_id))
    monkeypatch.setattr(scheduler_module, "PAUSE_GRACE_S", -1)
    sched.tick()
    assert _status(sessions, job_id) == (states.PAUSED, 1)
    assert launcher.state(job_id) is RunState.STOPPED
