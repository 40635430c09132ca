"""Fine-tuning jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints (tenant-scoped)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.responses import Response

from service.api.deps import CurrentTenant, ReadDB, SessionDep, SettingsDep
from service.api.schemas.common import After, EventCursor, Limit, ListPage, json_response, to_page
from service.api.schemas.jobs import CheckpointPublic, EventPublic, JobCreate, JobPublic
from service.jobs import repository as jobs
from service.jobs.pause import pause_job, resume_job
from service.jobs.states import JOB_STATUSES
from service.jobs.submit import cancel_job, submit_job
from workers.spec import Resources

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

StatusFilter = Annotated[Literal[JOB_STATUSES] | None, Query(description="Only jobs in this status")]  # type: ignore[valid-type]


@router.post("", status_code=201)
def create_job(body: JobCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> JobPublic:
    method, hyperparameters = body.resolved()
    job = submit_job(session, tenant_id=tenant.tenant_id, model=body.model,
                     training_file=body.training_file, validation_file=body.validation_file,
                     method=method, hyperparameters=hyperparameters,
                     resources=body.resources or Resources(), suffix=body.suffix,
                     metadata=body.metadata, method_type=body.method.type if body.method else "lora",
                     settings=settings, auto=body.auto_fields())
    session.commit()
    return JobPublic.of(job)


@router.get("", response_model=ListPage[JobPublic])
async def list_jobs(tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: After = None,
                    status: StatusFilter = None) -> Response:
    page = await db.rows(jobs.list_job_rows, tenant_id=tenant.tenant_id, after=after, limit=limit, status=status)
    return json_response(ListPage[JobPublic].of([JobPublic.of(r) for r in page.items], page.has_more))


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, tenant: CurrentTenant, db: ReadDB) -> Response:
    return json_response(JobPublic.of(await db.rows(jobs.get_job_row, tenant_id=tenant.tenant_id, job_id=job_id)))


@router.post("/{job_id}/cancel")
def cancel(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    job = jobs.get_job_for_tenant(session, tenant_id=tenant.tenant_id, job_id=job_id, for_update=True)
    cancel_job(session, job)
    session.commit()
    return JobPublic.of(job)


@router.post("/{job_id}/pause")
def pause(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    job = jobs.get_job_for_tenant(session, tenant_id=tenant.tenant_id, job_id=job_id, for_update=True)
    pause_job(session, job)
    session.commit()
    return JobPublic.of(job)


@router.post("/{job_id}/resume")
def resume(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    job = jobs.get_job_for_tenant(session, tenant_id=tenant.tenant_id, job_id=job_id, for_update=True)
    resume_job(session, job)
    session.commit()
    return JobPublic.of(job)


@router.get("/{job_id}/events")
async def list_events(job_id: str, tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: EventCursor = None,
                      order: Literal["asc", "desc"] = "desc") -> ListPage[EventPublic]:
    page = await db.run(jobs.list_events_for_tenant, tenant_id=tenant.tenant_id, job_id=job_id,
                        after=after, limit=limit, oldest_first=order == "asc")
    return to_page(page, EventPublic.of)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, tenant: CurrentTenant, db: ReadDB, limit: Limit = 20,
                           after: After = None) -> ListPage[CheckpointPublic]:
    page = await db.run(jobs.list_checkpoints_for_tenant, tenant_id=tenant.tenant_id, job_id=job_id,
                        after=after, limit=limit)
    return to_page(page, CheckpointPublic.of)
