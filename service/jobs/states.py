"""The fine-tuning job state machine: every allowed transition is declared here and only here.

``transition`` is the one way a job's status changes (API, scheduler and worker callbacks all
call it). It is a compare-and-set on the current status, so a racing writer (say the scheduler
starting a job the tenant just cancelled) loses with InvalidTransition instead of overwriting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import and_, insert, or_, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.errors import InvalidTransition
from service.ids import now

VALIDATING_FILES = "validating_files"
QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
PAUSING = "pausing"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

JOB_STATUSES = (VALIDATING_FILES, QUEUED, RUNNING, CANCELLING, PAUSING, PAUSED, SUCCEEDED, FAILED,
                CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Statuses that count against a tenant's queue / concurrency quotas.
PENDING = frozenset({VALIDATING_FILES, QUEUED})
# A pausing run still holds its resources until its checkpoint is written; a paused job holds
# none and counts against neither quota.
ACTIVE = frozenset({RUNNING, CANCELLING, PAUSING})

ALLOWED: dict[str, frozenset[str]] = {
    VALIDATING_FILES: frozenset({QUEUED, FAILED, CANCELLED}),
    # queued → failed: the scheduler could not build the run (e.g. the base model is gone).
    QUEUED: frozenset({RUNNING, CANCELLING, CANCELLED, FAILED}),
    # running → queued: requeued after a lost worker.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, CANCELLING, QUEUED, PAUSING}),
    # cancelling → failed: the run crashed while being stopped.
    CANCELLING: frozenset({CANCELLED, FAILED}),
    # pausing → paused once the run wrote its checkpoint and stopped; → succeeded when it finished
    # before it saw the request; → cancelling when cancelled meanwhile; → queued when its worker
    # was lost (it resumes from its last checkpoint like any requeued run).
    PAUSING: frozenset({PAUSED, SUCCEEDED, FAILED, CANCELLING, QUEUED}),
    # paused → queued: resumed; paused → cancelled: dropped without a run to stop.
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


def can_transition(from_status: str, to_status: str) -> bool:
    return to_status in ALLOWED.get(from_status, frozenset())


def transition(session: Session, job: Any, to_status: str, *, message: str | None = None,
               **fields: Any) -> None:
    """Move ``job`` (a service.db.models.Job) to ``to_status``, setting ``fields`` with it.

    Writes a ``status`` event. Raises InvalidTransition if the move is not declared above or if
    the row's status changed underneath us. Does not commit: the caller owns the transaction.
    """
    if not transition_many(session, [job], to_status, message=message, **fields):
        session.refresh(job)  # what the racing writer left: the error names it
        raise InvalidTransition(job.id, job.status, to_status)


def transition_many(session: Session, jobs: Sequence[Any], to_status: str, *,
                    message: str | Callable[[Any], str] | None = None, **fields: Any) -> list[Any]:
    """Move each of ``jobs`` to ``to_status`` in one UPDATE … RETURNING and one INSERT of events.

    The batch form of ``transition`` (the scheduler starts a pass's jobs with it): every move is
    checked against ALLOWED first, and InvalidTransition is raised before anything is written if
    one is not declared. Each row is compare-and-set on the status its object holds; a job whose
    row changed underneath us is left as it is and out of the returned list (the moved jobs, in
    the order given), so one racing cancel does not undo the others. ``fields`` are set on every
    moved row; a value may be an SQL expression of the row (``Job.attempts + 1``). ``message``
    may be a function of the moved job. The objects get the values the database returned.
    Does not commit: the caller owns the transaction.
    """
    # Imported here: service.db.models imports this module for JOB_STATUSES.
    from service.db.models import Job, JobEventRow

    if not jobs:
        return []
    from_status = {job.id: job.status for job in jobs}
    for job in jobs:
        if not can_transition(from_status[job.id], to_status):
            raise InvalidTransition(job.id, from_status[job.id], to_status)
    for name in fields:
        if name not in Job.__table__.c and name != "user_metadata":
            raise TypeError(f"Job has no column {name!r}")
    ts = now()
    values: dict[str, Any] = {"status": to_status, "updated_at": ts, **fields}
    if to_status == RUNNING:
        values.setdefault("started_at", ts)
    if to_status in TERMINAL:
        values.setdefault("finished_at", ts)
    by_from: dict[str, list[str]] = {}
    for job_id, status in from_status.items():
        by_from.setdefault(status, []).append(job_id)
    names = list(values)
    # The objects are updated from RETURNING below, not by the ORM (it cannot evaluate an
    # expression such as attempts + 1, and "fetch" would re-read every row).
    returned = session.execute(
        update(Job).where(or_(*(and_(Job.id.in_(ids), Job.status == status) for status, ids in by_from.items())))
        .values(**values).returning(Job.id, *(getattr(Job, n) for n in names))
        .execution_options(synchronize_session=False)
    ).all()
    moved_values = {row[0]: row[1:] for row in returned}
    moved = [job for job in jobs if job.id in moved_values]
    level = "error" if to_status == FAILED else "info"
    error = ({"code": fields["error_code"], "message": fields.get("error_message"),
              "param": fields.get("error_param")} if fields.get("error_code") else None)
    events = []
    for job in moved:
        for name, value in zip(names, moved_values[job.id], strict=True):
            set_committed_value(job, name, value)
        data: dict[str, Any] = {"from": from_status[job.id], "to": to_status}
        if error:
            data["error"] = error
        text = message(job) if callable(message) else message
        events.append({"job_id": job.id, "created_at": ts, "level": level, "type": "status",
                       "message": text or f"Job status: {to_status}", "data": data})
    if events:
        session.execute(insert(JobEventRow), events)
    return moved
