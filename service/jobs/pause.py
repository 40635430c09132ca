"""Pausing and resuming jobs (OpenAI's POST …/pause and …/resume).

A pause asks the running worker to stop: the job goes ``running → pausing``, the worker's status
poll sees it, writes a checkpoint at the step it reached and exits, and the scheduler moves the
job to ``paused`` once the run has ended (service.scheduler). A paused job holds no compute and
counts against neither quota. Resuming requeues it; its next run resumes from that checkpoint,
so the result is the one an uninterrupted run gives.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Job, Tenant
from service.errors import Conflict, QuotaExceeded
from service.jobs import repository as jobs
from service.jobs import states

NOT_PAUSABLE = "job_not_pausable"
NOT_RESUMABLE = "job_not_resumable"


def pause_job(session: Session, job: Job) -> Job:
    """running → pausing; a job already pausing or paused is left as it is (a retried request)."""
    if job.status in (states.PAUSING, states.PAUSED):
        return job
    if job.status != states.RUNNING:
        raise Conflict(f"job {job.id} is {job.status!r}: only a running job can be paused",
                       code=NOT_PAUSABLE, param="fine_tuning_job_id")
    states.transition(session, job, states.PAUSING,
                      message="Pause requested; the run writes a checkpoint and stops")
    return job


def resume_job(session: Session, job: Job) -> Job:
    """paused → queued, under the tenant's queue quota like any queued job."""
    if job.status != states.PAUSED:
        raise Conflict(f"job {job.id} is {job.status!r}: only a paused job can be resumed",
                       code=NOT_RESUMABLE, param="fine_tuning_job_id")
    tenant = session.scalars(select(Tenant).where(Tenant.id == job.tenant_id).with_for_update()).one()
    pending = jobs.count_jobs(session, tenant_id=job.tenant_id, statuses=states.PENDING)
    if pending >= tenant.max_queued_jobs:
        raise QuotaExceeded(f"{pending} jobs already queued; the limit is {tenant.max_queued_jobs}",
                            retry_after=60)
    step = job.last_checkpoint_step or 0
    states.transition(session, job, states.QUEUED, message=f"Job resumed; requeued, continuing from step {step}")
    return job
