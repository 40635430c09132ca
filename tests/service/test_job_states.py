"""The job state machine: declared transitions only, a status event per move, compare-and-set."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service.catalog.repository import DEFAULT_BASE_MODEL, ensure_base_model
from service.db.models import JobEventRow
from service.db.session import make_engine, make_session_factory
from service.errors import InvalidTransition
from service.jobs import repository as jobs
from service.jobs import states
from service.tenants.repository import create_tenant


def _job(session):
    tenant = create_tenant(session, name="t", max_concurrent_jobs=1, max_queued_jobs=5,
                           requests_per_minute=60)
    ensure_base_model(session, **DEFAULT_BASE_MODEL)
    job = jobs.create_job(session, tenant_id=tenant.id, model=DEFAULT_BASE_MODEL["id"],
                          training_file="file-x", validation_file=None, method="lora",
                          hyperparameters={"r": 8}, resources={}, suffix=None, seed=1, metadata=None)
    session.commit()
    return job


def test_happy_path_writes_one_status_event_per_move(session):
    job = _job(session)
    for to in (states.QUEUED, states.RUNNING, states.SUCCEEDED):
        states.transition(session, job, to)
    session.commit()
    assert job.status == states.SUCCEEDED
    assert job.started_at is not None and job.finished_at is not None
    moves = [e.data["to"] for e in session.scalars(
        select(JobEventRow).where(JobEventRow.job_id == job.id).order_by(JobEventRow.id))]
    assert moves == [states.VALIDATING_FILES, states.QUEUED, states.RUNNING, states.SUCCEEDED]


def test_failure_fields_and_terminal_states_are_final(session):
    job = _job(session)
    states.transition(session, job, states.FAILED, error_code="invalid_training_file",
                      error_message="bad", error_param="training_file")
    session.commit()
    assert (job.error_code, job.error_param) == ("invalid_training_file", "training_file")
    for to in states.JOB_STATUSES:
        with pytest.raises(InvalidTransition):
            states.transition(session, job, to)


@pytest.mark.parametrize("path,illegal", [
    ((), states.RUNNING),  # validating_files → running skips the queue
    ((states.QUEUED,), states.SUCCEEDED),
    ((states.QUEUED, states.CANCELLING), states.RUNNING),
])
def test_undeclared_moves_raise(session, path, illegal):
    job = _job(session)
    for to in path:
        states.transition(session, job, to)
    with pytest.raises(InvalidTransition):
        states.transition(session, job, illegal)


def test_a_racing_writer_loses(session, database_url):
    """Another session moved the job first: our stale object must not overwrite it."""
    job = _job(session)
    states.transition(session, job, states.QUEUED)
    session.commit()
    engine = make_engine(database_url)
    with make_session_factory(engine)() as other:
        theirs = jobs.get_job(other, job_id=job.id)
        states.transition(other, theirs, states.CANCELLED)
        other.commit()
    engine.dispose()
    with pytest.raises(InvalidTransition):
        states.transition(session, job, states.RUNNING)  # our copy still says queued
    assert job.status == states.CANCELLED
