"""states.transition_many: the scheduler's batched start keeps the state machine's rules."""

from __future__ import annotations

import pytest
from sqlalchemy import event, func, select

from service.catalog.repository import DEFAULT_BASE_MODEL, ensure_base_model
from service.db.models import Job, JobEventRow
from service.db.session import make_engine, make_session_factory
from service.errors import InvalidTransition
from service.jobs import repository as jobs
from service.jobs import states
from service.tenants.repository import create_tenant


def _queued_jobs(session, n):
    tenant = create_tenant(session, name="t", max_concurrent_jobs=n, max_queued_jobs=n,
                           requests_per_minute=60)
    ensure_base_model(session, **DEFAULT_BASE_MODEL)
    made = [jobs.create_job(session, tenant_id=tenant.id, model=DEFAULT_BASE_MODEL["id"],
                            training_file="file-x", validation_file=None, method="lora",
                            hyperparameters={"r": 8}, resources={}, suffix=None, seed=1, metadata=None)
            for _ in range(n)]
    for job in made:
        states.transition(session, job, states.QUEUED)
    session.commit()
    return made


def _events(session, job):
    return list(session.scalars(select(JobEventRow).where(JobEventRow.job_id == job.id).order_by(JobEventRow.id)))


def test_moves_every_job_with_row_expressions_and_one_event_each(session):
    batch = _queued_jobs(session, 3)
    moved = states.transition_many(session, list(reversed(batch)), states.RUNNING, attempts=Job.attempts + 1,
                                   message=lambda job: f"started run {job.attempts}")
    session.commit()
    assert [j.id for j in moved] == [j.id for j in reversed(batch)]  # the order given
    for job in batch:
        session.refresh(job)
        assert (job.status, job.attempts) == (states.RUNNING, 1)
        assert job.started_at is not None and job.finished_at is None
        last = _events(session, job)[-1]
        assert (last.message, last.data) == ("started run 1", {"from": states.QUEUED, "to": states.RUNNING})


def test_objects_carry_the_database_values_without_a_reread(session):
    batch = _queued_jobs(session, 2)
    statements: list[str] = []
    engine = session.get_bind()
    listener = lambda conn, cursor, statement, *rest: statements.append(statement.split()[0])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        moved = states.transition_many(session, batch, states.RUNNING, attempts=Job.attempts + 1)
        # Read before commit: what RETURNING gave, not stale attributes, and no re-read.
        assert [(j.status, j.attempts) for j in moved] == [(states.RUNNING, 1)] * 2
        assert all(j.started_at == j.updated_at for j in moved)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert statements == ["UPDATE", "INSERT"]  # one of each, whatever the batch's size
    assert not session.dirty  # nothing left for the ORM to write back
    session.commit()


def test_a_job_moved_underneath_is_left_out_and_the_others_move(session, database_url):
    first, second, third = _queued_jobs(session, 3)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as other:
        states.transition(other, jobs.get_job(other, job_id=second.id), states.CANCELLED)
        other.commit()
    engine.dispose()
    moved = states.transition_many(session, [first, second, third], states.RUNNING, attempts=Job.attempts + 1)
    session.commit()
    assert [j.id for j in moved] == [first.id, third.id]
    session.refresh(second)
    assert (second.status, second.attempts) == (states.CANCELLED, 0)
    assert [e.data["to"] for e in _events(session, second)][-1] == states.CANCELLED  # no event of ours


def test_an_undeclared_move_writes_nothing(session):
    batch = _queued_jobs(session, 2)
    states.transition(session, batch[1], states.CANCELLED)
    session.commit()
    before = session.scalar(select(func.count()).select_from(JobEventRow))
    with pytest.raises(InvalidTransition):
        states.transition_many(session, batch, states.RUNNING)  # cancelled → running is not declared
    session.rollback()
    assert session.scalar(select(func.count()).select_from(JobEventRow)) == before
    session.refresh(batch[0])
    assert batch[0].status == states.QUEUED


def test_failure_fields_go_on_each_row_and_event(session):
    batch = _queued_jobs(session, 2)
    states.transition_many(session, batch, states.FAILED, error_code="insufficient_resources",
                           error_message="too big", error_param="resources")
    session.commit()
    for job in batch:
        session.refresh(job)
        assert (job.status, job.error_code, job.error_param) == (states.FAILED, "insufficient_resources", "resources")
        assert job.finished_at is not None
        last = _events(session, job)[-1]
        assert last.level == "error"
        assert last.data["error"] == {"code": "insufficient_resources", "message": "too big", "param": "resources"}


def test_no_jobs_no_statements(session):
    assert states.transition_many(session, [], states.RUNNING) == []
