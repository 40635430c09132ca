"""Merge-and-export (chapter 6.2.4): an adapter merged into its base model, as a full model the
tenant downloads. Created here, run as a Ray Job (service.exports.dispatch)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import CurrentTenant, ReadDB, SessionDep, StoreDep
from service.api.schemas.common import After, Limit, ListPage, to_page
from service.api.schemas.exports import ExportCreate, ExportPublic, OperationEventPublic
from service.api.streams import iter_chunks
from service.catalog import repository as catalog
from service.errors import Conflict, NotFound
from service.exports import repository as ops
from service.exports import states
from service.exports.create import create_export

router = APIRouter(tags=["exports"])


@router.post("/v1/models/{adapter_id}/exports", status_code=201)
def create(adapter_id: str, tenant: CurrentTenant, session: SessionDep, body: ExportCreate | None = None) -> ExportPublic:
    body = body or ExportCreate()
    op = create_export(session, tenant_id=tenant.tenant_id, adapter_id=adapter_id, dtype=body.dtype,
                       max_shard_size=body.max_shard_size)
    session.commit()
    return ExportPublic.of(op)


@router.get("/v1/models/{adapter_id}/exports")
async def list_exports(adapter_id: str, tenant: CurrentTenant, db: ReadDB, limit: Limit = 20,
                       after: After = None) -> ListPage[ExportPublic]:
    await db.run(catalog.get_adapter_for_tenant, tenant_id=tenant.tenant_id, adapter_id=adapter_id,
                 param="adapter_id")
    page = await db.run(ops.list_for_tenant, tenant_id=tenant.tenant_id, kind="export", adapter_id=adapter_id,
                        after=after, limit=limit)
    return to_page(page, ExportPublic.of)


@router.get("/v1/exports/{export_id}")
async def get_export(export_id: str, tenant: CurrentTenant, db: ReadDB) -> ExportPublic:
    return ExportPublic.of(await db.run(ops.get_for_tenant, tenant_id=tenant.tenant_id, kind="export",
                                        operation_id=export_id))


@router.get("/v1/exports/{export_id}/events")
async def list_events(export_id: str, tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: After = None,
                      order: Literal["asc", "desc"] = "desc") -> ListPage[OperationEventPublic]:
    page = await db.run(ops.list_events_for_tenant, tenant_id=tenant.tenant_id, kind="export",
                        operation_id=export_id, after=after, limit=limit, oldest_first=order == "asc")
    return to_page(page, OperationEventPublic.of)


@router.get("/v1/exports/{export_id}/files/{name:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_file(export_id: str, name: str, tenant: CurrentTenant, db: ReadDB, store: StoreDep) -> StreamingResponse:
    op = await db.run(ops.get_for_tenant, tenant_id=tenant.tenant_id, kind="export", operation_id=export_id)
    if op.status != states.SUCCEEDED:
        raise Conflict(f"export {export_id} is {op.status}; its files are there once it succeeded",
                       code="export_not_ready", param="export_id")
    entry = next((f for f in op.files or [] if f["name"] == name), None)
    if entry is None:  # only names from the manifest: no path tricks reach the store
        raise NotFound(f"export {export_id} has no file {name!r}", param="name")
    stream = await run_in_threadpool(store.open, f"{op.key_prefix}/{name}")
    return StreamingResponse(iter_chunks(stream), media_type="application/octet-stream",
                             headers={"Content-Length": str(entry["bytes"])})
