"""Worker → control plane: progress events, checkpoints, the result, failures, status polls.

Authenticated by the run-scoped job token (service.security.job_token, checked in
service.api.deps): a worker can only touch its own job, only while its run (attempt) is the
job's current one and the job is active — 409 ``run_over`` after that, events included; only the
status poll still answers the current run once the job ended. Workers hold no database
credentials.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field, field_validator

from service.api.deps import JobIdForStatusPoll, ReadDB, SessionDep, StoreDep, WorkerRunFromToken, lock_current_run
from service.api.schemas.common import Strict
from service.api.schemas.jobs import CheckpointPublic
from service.errors import ValidationFailed
from service.ids import now
from service.jobs import repository as jobs
from service.jobs import states
from service.jobs.naming import checkpoint_prefix
from service.jobs.public_errors import tenant_failure_message
from service.jobs.results import commit_result
from workers.spec import PLATFORM_ERROR_CODES, USER_ERROR_CODES, CheckpointReport, JobEvent, TrainResult

router = APIRouter(prefix="/internal/v1/jobs/{job_id}", tags=["internal"])


class EventBatch(Strict):
    events: Annotated[list[JobEvent], Field(min_length=1, max_length=1000)]


class FailureReport(Strict):
    code: str
    message: Annotated[str, Field(max_length=10_000)]
    param: Annotated[str, Field(max_length=200)] | None = None

    @field_validator("code")
    @classmethod
    def _known(cls, code: str) -> str:
        if code not in USER_ERROR_CODES | PLATFORM_ERROR_CODES:
            raise ValueError(f"unknown error code; use one of {sorted(USER_ERROR_CODES | PLATFORM_ERROR_CODES)}")
        return code


class ResultAccepted(BaseModel):
    adapter_id: str


class JobStatus(BaseModel):
    status: Literal[states.JOB_STATUSES]  # type: ignore[valid-type]


# Every write locks the job's row and re-checks that the token's run is still the current,
# active one (lock_current_run): the check in the dependency was a separate read, and a requeue
# or cancel landing in between must not let a stale run write. The lock is held to the commit.


@router.post("/events", status_code=204)
def post_events(run: WorkerRunFromToken, body: EventBatch, session: SessionDep) -> Response:
    job = lock_current_run(session, run)
    jobs.add_events(session, job_id=job.id, events=[e.model_dump() for e in body.events])
    # The latest ETA a worker reports becomes the job's estimated_finish.
    etas = [e.data["eta_s"] for e in body.events
            if e.type == "metrics" and e.data and isinstance(e.data.get("eta_s"), int | float)]
    if etas:
        job.estimated_finish = now() + int(etas[-1])
    session.commit()
    return Response(status_code=204)


@router.post("/checkpoints", status_code=201)
def post_checkpoint(run: WorkerRunFromToken, body: CheckpointReport, session: SessionDep) -> CheckpointPublic:
    job = lock_current_run(session, run)
    if not body.key_prefix.startswith(checkpoint_prefix(job) + "/"):
        raise ValidationFailed(f"key_prefix must be under {checkpoint_prefix(job)}/", param="key_prefix")
    ckpt = jobs.add_checkpoint(session, job=job, step=body.step, key_prefix=body.key_prefix,
                               metrics=body.metrics)
    session.commit()
    return CheckpointPublic.of(ckpt)


@router.post("/result")
def post_result(run: WorkerRunFromToken, body: TrainResult, session: SessionDep,
                store: StoreDep) -> ResultAccepted:
    # The lock is held while the adapter files are verified (a cancel waits that long; the
    # scheduler skips locked rows): a newer run must not start until this result is settled.
    job = lock_current_run(session, run)
    adapter = commit_result(session, store, job, body)
    session.commit()
    if adapter is None:
        raise ValidationFailed(job.error_message or "adapter rejected", code="storage_error",
                               param="manifest_key")
    return ResultAccepted(adapter_id=adapter.id)


@router.post("/failure", status_code=204)
def post_failure(run: WorkerRunFromToken, body: FailureReport, session: SessionDep) -> Response:
    job = lock_current_run(session, run)
    # A platform failure's text comes from Ray, boto, torch...: our log keeps it, the tenant
    # reads our words (service.jobs.public_errors).
    message = tenant_failure_message(job.id, body.code, body.message)
    states.transition(session, job, states.FAILED, error_code=body.code, error_message=message,
                      error_param=body.param, message=f"Job failed: {message}")
    session.commit()
    return Response(status_code=204)


@router.get("/status")
async def get_status(job_id: JobIdForStatusPoll, db: ReadDB) -> JobStatus:
    return JobStatus(status=(await db.run(jobs.get_job, job_id=job_id)).status)
