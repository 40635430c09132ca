"""Admin: tenants and their quotas, API keys, base models. Every route needs the admin token."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import AdminDep, ReadDB, SessionDep, SettingsDep
from service.api.schemas.admin import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    BaseModelCreate,
    BaseModelPublic,
    TenantCreate,
    TenantPublic,
    TenantUpdate,
)
from service.api.schemas.common import After, Limit, ListPage, to_page
from service.catalog import repository as catalog
from service.tenants import repository as tenants

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, session: SessionDep, settings: SettingsDep) -> TenantPublic:
    defaults = settings.tenant_defaults
    tenant = tenants.create_tenant(
        session, name=body.name,
        max_concurrent_jobs=body.max_concurrent_jobs if body.max_concurrent_jobs is not None
        else defaults.max_concurrent_jobs,
        max_queued_jobs=body.max_queued_jobs if body.max_queued_jobs is not None
        else defaults.max_queued_jobs,
        requests_per_minute=body.requests_per_minute or defaults.requests_per_minute,
        limits=body.model_dump(include=TenantCreate.CLEARABLE))
    session.commit()
    return TenantPublic.of(tenant)


@router.get("/tenants")
async def list_tenants(db: ReadDB, limit: Limit = 20, after: After = None) -> ListPage[TenantPublic]:
    return to_page(await db.run(tenants.list_tenants, after=after, limit=limit), TenantPublic.of)


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, db: ReadDB) -> TenantPublic:
    return TenantPublic.of(await db.run(tenants.get_tenant, tenant_id=tenant_id))


@router.patch("/tenants/{tenant_id}")
def update_tenant(tenant_id: str, body: TenantUpdate, session: SessionDep,
                  request: Request) -> TenantPublic:
    tenant = tenants.get_tenant(session, tenant_id=tenant_id)
    for name, value in body.model_dump(exclude_unset=True).items():
        if value is not None or name in TenantUpdate.CLEARABLE:  # null lifts a compute limit
            setattr(tenant, name, value)
    session.commit()
    request.app.state.principals.forget(tenant_id=tenant_id)  # status and rate apply at once
    return TenantPublic.of(tenant)


@router.post("/tenants/{tenant_id}/api_keys", status_code=201)
def create_api_key(tenant_id: str, session: SessionDep, settings: SettingsDep,
                   body: ApiKeyCreate | None = None) -> ApiKeyCreated:
    tenants.get_tenant(session, tenant_id=tenant_id)
    key, secret = tenants.create_api_key(session, tenant_id=tenant_id, name=body.name if body else None,
                                         settings=settings)
    session.commit()
    return ApiKeyCreated(**ApiKeyPublic.of(key).model_dump(), key=secret)


@router.get("/tenants/{tenant_id}/api_keys")
async def list_api_keys(tenant_id: str, db: ReadDB, limit: Limit = 20,
                        after: After = None) -> ListPage[ApiKeyPublic]:
    page = await db.run(tenants.list_api_keys, tenant_id=tenant_id, after=after, limit=limit)
    return to_page(page, ApiKeyPublic.of)


@router.delete("/api_keys/{key_id}")
def revoke_api_key(key_id: str, session: SessionDep, request: Request) -> ApiKeyPublic:
    key = tenants.revoke_api_key(session, key_id=key_id)
    session.commit()
    request.app.state.principals.forget(key_id=key_id)
    return ApiKeyPublic.of(key)


@router.post("/models", status_code=201)
def register_model(body: BaseModelCreate, session: SessionDep) -> BaseModelPublic:
    row = catalog.create_base_model(session, **body.model_dump())
    session.commit()
    return BaseModelPublic.of(row)


@router.get("/models")
async def list_models(db: ReadDB) -> ListPage[BaseModelPublic]:
    rows = await db.run(catalog.list_base_models)
    return ListPage[BaseModelPublic].of([BaseModelPublic.of(m) for m in rows], has_more=False)
