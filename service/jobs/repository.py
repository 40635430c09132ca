"""Data access for jobs, their events and checkpoints. Keyword-only; callers own the transaction."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Integer, RowMapping, Select, bindparam, func, select
from sqlalchemy.orm import Session

from service.db.models import Checkpoint, Job, JobEventRow
from service.db.pages import Page, fetch_page, parse_int_cursor
from service.errors import NotFound
from service.ids import new_id, now
from service.jobs.states import VALIDATING_FILES

JOB_ID_PREFIX = "ftjob-"
EVENT_ID_PREFIX = "ftevent-"


def create_job(session: Session, *, tenant_id: str, model: str, training_file: str,
               validation_file: str | None, method: str, hyperparameters: dict[str, Any],
               resources: dict[str, Any], suffix: str | None, seed: int,
               metadata: dict[str, Any] | None, auto_hyperparameters: list[str] | None = None,
               sweep_id: str | None = None) -> Job:
    """A new job in ``validating_files``, with its first status event."""
    ts = now()
    job = Job(id=new_id(JOB_ID_PREFIX), tenant_id=tenant_id, model=model,
              training_file=training_file, validation_file=validation_file,
              status=VALIDATING_FILES, method=method, hyperparameters=hyperparameters,
              resources=resources, suffix=suffix, seed=seed, user_metadata=metadata,
              auto_hyperparameters=auto_hyperparameters, sweep_id=sweep_id,
              attempts=0, created_at=ts, updated_at=ts)
    session.add(job)
    session.flush()
    session.add(JobEventRow(job_id=job.id, created_at=ts, level="info", type="status",
                            message="Job created; validating files",
                            data={"from": None, "to": VALIDATING_FILES}))
    return job


def get_job(session: Session, *, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
    return job


def get_job_for_tenant(session: Session, *, tenant_id: str, job_id: str,
                       for_update: bool = False) -> Job:
    """The tenant's job; another tenant's job is NotFound exactly like a missing one."""
    query = select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    job = session.scalars(query).one_or_none()
    if job is None:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
    return job


def list_jobs(session: Session, *, tenant_id: str, after: str | None = None, limit: int = 20,
              status: str | None = None) -> Page[Job]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    return fetch_page(session, query, Job.id, after=after, limit=limit)


# Read routes (GET a job, list pages) select plain Core row mappings: no Session, identity map or
# instance state, which were most of a poll's CPU. The keys are the ORM attribute names
# (``metadata`` comes back as ``user_metadata``).
_jobs = Job.__table__
JOB_ROW_COLUMNS = tuple(c.label("user_metadata") if c.name == "metadata" else c for c in _jobs.c)
_JOB_ROW_FOR_TENANT = select(*JOB_ROW_COLUMNS).where(
    _jobs.c.id == bindparam("job_id"), _jobs.c.tenant_id == bindparam("tenant_id"))


def get_job_row(db: Connection | Session, *, tenant_id: str, job_id: str) -> RowMapping:
    """``get_job_for_tenant`` as a read-only row (another tenant's job is NotFound too)."""
    row = db.execute(_JOB_ROW_FOR_TENANT, {"job_id": job_id, "tenant_id": tenant_id}).mappings().one_or_none()
    if row is None:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
    return row


@functools.cache
def _job_page_query(by_status: bool, after: bool) -> Select[Any]:
    """``list_jobs``'s query, built once per shape with bind parameters (a page is one of
    four statements: no per-request construction or cache-key walk of a fresh select)."""
    query = select(*JOB_ROW_COLUMNS).where(_jobs.c.tenant_id == bindparam("tenant_id"))
    if by_status:
        query = query.where(_jobs.c.status == bindparam("status"))
    if after:
        query = query.where(_jobs.c.id < bindparam("after"))
    return query.order_by(_jobs.c.id.desc()).limit(bindparam("limit", type_=Integer))


def list_job_rows(db: Connection | Session, *, tenant_id: str, after: str | None = None, limit: int = 20,
                  status: str | None = None) -> Page[RowMapping]:
    """``list_jobs`` as read-only rows (same order and cursor: newest first, ids below ``after``)."""
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit + 1}
    if status is not None:
        params["status"] = status
    if after is not None:
        params["after"] = after
    rows = db.execute(_job_page_query(status is not None, after is not None), params).mappings().all()
    return Page(items=rows[:limit], has_more=len(rows) > limit)


def count_jobs(session: Session, *, tenant_id: str, statuses: Iterable[str]) -> int:
    query = select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(list(statuses)))
    return session.scalar(query) or 0


def count_jobs_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: n for status, n in rows}


def add_events(session: Session, *, job_id: str, events: Iterable[dict[str, Any]]) -> int:
    """Append events (dicts shaped like workers.spec.JobEvent) in the given order."""
    ts = now()
    rows = [JobEventRow(job_id=job_id, created_at=ts, level=e.get("level", "info"),
                        type=e.get("type", "message"), message=e["message"], data=e.get("data"))
            for e in events]
    session.add_all(rows)
    return len(rows)


def event_public_id(event: JobEventRow) -> str:
    return f"{EVENT_ID_PREFIX}{event.id}"


def parse_event_cursor(after: str | None) -> int | None:
    """``ftevent-<n>`` → n. A malformed cursor is a 422 (``invalid_cursor``), not a 500."""
    return parse_int_cursor(after, prefix=EVENT_ID_PREFIX)


def list_events(session: Session, *, job_id: str, after: str | None = None, limit: int = 20,
                oldest_first: bool = False) -> Page[JobEventRow]:
    query = select(JobEventRow).where(JobEventRow.job_id == job_id)
    return fetch_page(session, query, JobEventRow.id, after=parse_event_cursor(after),
                      limit=limit, newest_first=not oldest_first)


def list_events_for_tenant(session: Session, *, tenant_id: str, job_id: str, after: str | None = None,
                           limit: int = 20, oldest_first: bool = False) -> Page[JobEventRow]:
    get_job_for_tenant(session, tenant_id=tenant_id, job_id=job_id)
    return list_events(session, job_id=job_id, after=after, limit=limit, oldest_first=oldest_first)


def add_checkpoint(session: Session, *, job: Job, step: int, key_prefix: str,
                   metrics: dict[str, float]) -> Checkpoint:
    """Record a checkpoint (idempotent per step: a re-report updates it) and a checkpoint event."""
    ckpt = session.scalars(select(Checkpoint).where(
        Checkpoint.job_id == job.id, Checkpoint.step_number == step)).one_or_none()
    ts = now()
    if ckpt is None:
        ckpt = Checkpoint(id=new_id("ftckpt-"), job_id=job.id, step_number=step,
                          key_prefix=key_prefix, metrics=metrics, created_at=ts)
        session.add(ckpt)
    else:
        ckpt.key_prefix, ckpt.metrics = key_prefix, metrics
    job.last_checkpoint_step = max(step, job.last_checkpoint_step or 0)
    session.add(JobEventRow(job_id=job.id, created_at=ts, level="info", type="checkpoint",
                            message=f"Checkpoint saved at step {step}",
                            data={"step": step, "key_prefix": key_prefix, **metrics}))
    session.flush()
    return ckpt


def list_checkpoints(session: Session, *, job_id: str, after: str | None = None,
                     limit: int = 20) -> Page[Checkpoint]:
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    return fetch_page(session, query, Checkpoint.id, after=after, limit=limit)


def list_checkpoints_for_tenant(session: Session, *, tenant_id: str, job_id: str, after: str | None = None,
                                limit: int = 20) -> Page[Checkpoint]:
    get_job_for_tenant(session, tenant_id=tenant_id, job_id=job_id)
    return list_checkpoints(session, job_id=job_id, after=after, limit=limit)
