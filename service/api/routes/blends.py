"""Offline weighted blends (chapter 6.5.1, way 2): a new adapter of the tenant's own from several
of its adapters, made by PEFT's add_weighted_adapter in a Ray Job, then served like any other."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from service.api.deps import CurrentTenant, ReadDB, SessionDep, StoreDep
from service.api.schemas.common import After, Limit, ListPage, to_page
from service.api.schemas.exports import BlendCreate, BlendPublic, OperationEventPublic
from service.exports import repository as ops
from service.exports.create import create_blend

router = APIRouter(prefix="/v1/adapters", tags=["blends"])


@router.post("/blend", status_code=201)
def create(body: BlendCreate, tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> BlendPublic:
    op = create_blend(session, store, tenant_id=tenant.tenant_id, refs=[(a.model, float(a.weight)) for a in body.adapters],
                      combination=body.combination, name=body.name,
                      density=None if body.density is None else float(body.density))
    session.commit()
    return BlendPublic.of(op)


@router.get("/blends")
async def list_blends(tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: After = None) -> ListPage[BlendPublic]:
    page = await db.run(ops.list_for_tenant, tenant_id=tenant.tenant_id, kind="blend", after=after, limit=limit)
    return to_page(page, BlendPublic.of)


@router.get("/blends/{blend_id}")
async def get_blend(blend_id: str, tenant: CurrentTenant, db: ReadDB) -> BlendPublic:
    return BlendPublic.of(await db.run(ops.get_for_tenant, tenant_id=tenant.tenant_id, kind="blend",
                                       operation_id=blend_id))


@router.get("/blends/{blend_id}/events")
async def list_events(blend_id: str, tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: After = None,
                      order: Literal["asc", "desc"] = "desc") -> ListPage[OperationEventPublic]:
    page = await db.run(ops.list_events_for_tenant, tenant_id=tenant.tenant_id, kind="blend",
                        operation_id=blend_id, after=after, limit=limit, oldest_first=order == "asc")
    return to_page(page, OperationEventPublic.of)
