"""The fine-tuning job state machine: every allowed transition is declared here and only here.

``transition`` is the one way a job's status changes (API, scheduler and worker callbacks all
call it). It is a compare-and-set on the current status, so a racing writer (say the scheduler
starting a job the tenant just cancelled) loses with InvalidTransition instead of overwriting.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.errors import InvalidTransition
from service.ids import now

VALIDATING_FILES = "validating_files"
QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

JOB_STATUSES = (VALIDATING_FILES, QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Statuses that count against a tenant's queue / concurrency quotas.
PENDING = frozenset({VALIDATING_FILES, QUEUED})
ACTIVE = frozenset({RUNNING, CANCELLING})

ALLOWED: dict[str, frozenset[str]] = {
    VALIDATING_FILES: frozenset({QUEUED, FAILED, CANCELLED}),
    # queued → failed: the scheduler could not build the run (e.g. the base model is gone).
    QUEUED: frozenset({RUNNING, CANCELLING, CANCELLED, FAILED}),
    # running → queued: requeued after a lost worker.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, CANCELLING, QUEUED}),
    # cancelling → failed: the run crashed while being stopped.
    CANCELLING: frozenset({CANCELLED, FAILED}),
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
    # Imported here: service.db.models imports this module for JOB_STATUSES.
    from service.db.models import Job, JobEventRow

    from_status = job.status
    if not can_transition(from_status, to_status):
        raise InvalidTransition(job.id, from_status, to_status)
    for name in fields:
        if name not in Job.__table__.c and name != "user_metadata":
            raise TypeError(f"Job has no column {name!r}")
    ts = now()
    values: dict[str, Any] = {"status": to_status, "updated_at": ts, **fields}
    if to_status == RUNNING:
        values.setdefault("started_at", ts)
    if to_status in TERMINAL:
        values.setdefault("finished_at", ts)
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.status == from_status).values(**values)
        .execution_options(synchronize_session="fetch")
    )
    if result.rowcount != 1:
        session.refresh(job)
        raise InvalidTransition(job.id, job.status, to_status)
    session.refresh(job)
    level = "error" if to_status == FAILED else "info"
    data: dict[str, Any] = {"from": from_status, "to": to_status}
    if fields.get("error_code"):
        data["error"] = {"code": fields["error_code"], "message": fields.get("error_message"),
                         "param": fields.get("error_param")}
    session.add(JobEventRow(job_id=job.id, created_at=ts, level=level, type="status",
                            message=message or f"Job status: {to_status}", data=data))
