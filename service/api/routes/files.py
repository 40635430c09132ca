"""Files: upload (multipart, streamed, validated), list, retrieve, delete, content."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.api.deps import CurrentTenant, ReadDB, SessionDep, StoreDep
from service.api.schemas.common import After, Limit, ListPage, to_page
from service.api.schemas.files import FileDeleted, FilePublic
from service.api.streams import iter_chunks
from service.db.models import Job
from service.errors import Conflict
from service.files import repository as files
from service.files.upload import check_declared_length, parse_upload, store_upload, upload_filename
from service.jobs.states import TERMINAL

router = APIRouter(prefix="/v1/files", tags=["files"])

# The body is parsed by hand (to stream it under the size limit), so its schema is declared here.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary"},
                           "purpose": {"type": "string", "enum": ["fine-tune"]}},
        }}},
    }
}


@router.post("", status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload_file(request: Request, tenant: CurrentTenant, session: SessionDep,
                      store: StoreDep) -> FilePublic:
    settings = request.app.state.settings
    limit = settings.max_upload_bytes
    check_declared_length(request.headers, limit)
    upload, purpose = await parse_upload(request.headers, request.stream(), limit)
    try:
        row = await run_in_threadpool(store_upload, session, store, tenant_id=tenant.tenant_id,
                                      data=upload.file, filename=upload_filename(upload),
                                      purpose=purpose, limit=limit,
                                      max_line_bytes=settings.max_dataset_line_bytes)
    finally:
        await upload.close()
    return FilePublic.of(row)


@router.get("")
async def list_files(tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: After = None,
                     purpose: Annotated[str | None, Query(max_length=32)] = None) -> ListPage[FilePublic]:
    page = await db.run(files.list_files, tenant_id=tenant.tenant_id, purpose=purpose, after=after, limit=limit)
    return to_page(page, FilePublic.of)


@router.get("/{file_id}")
async def get_file(file_id: str, tenant: CurrentTenant, db: ReadDB) -> FilePublic:
    return FilePublic.of(await db.run(files.get_file_for_tenant, tenant_id=tenant.tenant_id, file_id=file_id))


@router.delete("/{file_id}")
def delete_file(file_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> FileDeleted:
    row = files.get_file_for_tenant(session, tenant_id=tenant.tenant_id, file_id=file_id)
    in_use = session.scalar(select(Job.id).where(
        Job.tenant_id == tenant.tenant_id, Job.status.not_in(TERMINAL),
        (Job.training_file == file_id) | (Job.validation_file == file_id)).limit(1))
    if in_use:
        raise Conflict(f"file {file_id} is used by job {in_use}, which has not finished", param="file_id")
    session.delete(row)
    session.commit()
    store.delete(row.object_key)  # after the commit: a failed commit must not lose the bytes
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def file_content(file_id: str, tenant: CurrentTenant, db: ReadDB, store: StoreDep) -> StreamingResponse:
    row = await db.run(files.get_file_for_tenant, tenant_id=tenant.tenant_id, file_id=file_id)
    stream = await run_in_threadpool(store.open, row.object_key)
    return StreamingResponse(iter_chunks(stream), media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes)})
