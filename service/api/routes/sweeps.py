"""Sweeps (chapter 6.2.3's rank experiment as a product feature): create, list, retrieve, cancel."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CurrentTenant, ReadDB, SessionDep, SettingsDep
from service.api.schemas.common import After, Limit, ListPage
from service.api.schemas.sweeps import SweepCreate, SweepPublic
from service.sweeps.fanout import create_sweep
from service.sweeps.table import cancel_sweep, list_sweeps, sweep_public

router = APIRouter(prefix="/v1/fine_tuning/sweeps", tags=["fine-tuning"])


@router.post("", status_code=201)
def create(body: SweepCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> SweepPublic:
    sweep = create_sweep(session, tenant_id=tenant.tenant_id, body=body, settings=settings)
    session.commit()
    return sweep_public(session, tenant_id=tenant.tenant_id, sweep_id=sweep.id)


@router.get("")
async def list_(tenant: CurrentTenant, db: ReadDB, limit: Limit = 20, after: After = None) -> ListPage[SweepPublic]:
    page = await db.run(list_sweeps, tenant_id=tenant.tenant_id, after=after, limit=limit)
    return ListPage[SweepPublic].of(page.items, page.has_more)


@router.get("/{sweep_id}")
async def retrieve(sweep_id: str, tenant: CurrentTenant, db: ReadDB) -> SweepPublic:
    return await db.run(sweep_public, tenant_id=tenant.tenant_id, sweep_id=sweep_id)


@router.post("/{sweep_id}/cancel")
def cancel(sweep_id: str, tenant: CurrentTenant, session: SessionDep) -> SweepPublic:
    result = cancel_sweep(session, tenant_id=tenant.tenant_id, sweep_id=sweep_id)
    session.commit()
    return result
