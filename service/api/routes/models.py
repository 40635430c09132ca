"""Models (base models + the tenant's adapters, OpenAI-style) and adapter details / files."""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import CurrentTenant, ReadDB, SessionDep, StoreDep
from service.api.schemas.common import ListPage
from service.api.schemas.models import AdapterPublic, ModelDeleted, ModelPublic
from service.api.streams import iter_chunks
from service.catalog import repository as catalog
from service.db.models import Adapter, BaseModelRow, Job
from service.errors import Forbidden, NotFound
from service.settings import Settings
from workers.signing import Signer
from workers.storage import delete_prefix

router = APIRouter(tags=["models"])
log = logging.getLogger(__name__)

BASE_OWNER = "lorafleet"


def _resolve(session: Session, *, tenant_id: str, model_id: str) -> BaseModelRow | Adapter:
    """A base model, or this tenant's adapter; anything else (another tenant's too) is NotFound."""
    base = session.get(BaseModelRow, model_id)
    if base is not None:
        return base
    return catalog.get_adapter_for_tenant(session, tenant_id=tenant_id, adapter_id=model_id)


def _public(row: BaseModelRow | Adapter, hyperparameters: dict | None = None) -> ModelPublic:
    if isinstance(row, BaseModelRow):
        return ModelPublic(id=row.id, created=row.created_at, owned_by=BASE_OWNER)
    method: dict = {"type": row.method}
    if hyperparameters is not None:
        method[row.method] = {"hyperparameters": hyperparameters}
    return ModelPublic(id=row.id, created=row.created_at, owned_by=row.tenant_id, method=method)


def _resolve_with_config(session: Session, *, tenant_id: str, model_id: str) -> ModelPublic:
    """_resolve, and an adapter's method with the hyperparameters its job trained it with."""
    row = _resolve(session, tenant_id=tenant_id, model_id=model_id)
    job = session.get(Job, row.job_id) if isinstance(row, Adapter) and row.job_id else None
    return _public(row, job.hyperparameters if job is not None else None)


def _all_models(session: Session, *, tenant_id: str) -> list[BaseModelRow | Adapter]:
    rows: list[BaseModelRow | Adapter] = [*catalog.list_base_models(session)]
    after = None
    while True:  # adapters are few per tenant; page through them all, as OpenAI lists all models
        page = catalog.list_adapters(session, tenant_id=tenant_id, after=after)
        rows.extend(page.items)
        if not page.has_more:
            return rows
        after = page.items[-1].id


@router.get("/v1/models")
async def list_models(tenant: CurrentTenant, db: ReadDB) -> ListPage[ModelPublic]:
    rows = await db.run(_all_models, tenant_id=tenant.tenant_id)
    return ListPage[ModelPublic].of([_public(r) for r in rows], has_more=False)


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, tenant: CurrentTenant, db: ReadDB) -> ModelPublic:
    return await db.run(_resolve_with_config, tenant_id=tenant.tenant_id, model_id=model_id)


@router.delete("/v1/models/{model_id:path}")
def delete_model(model_id: str, request: Request, tenant: CurrentTenant, session: SessionDep,
                 store: StoreDep) -> ModelDeleted:
    row = _resolve(session, tenant_id=tenant.tenant_id, model_id=model_id)
    if isinstance(row, BaseModelRow):
        raise Forbidden("base models are shared and cannot be deleted by a tenant", param="model")
    session.delete(row)
    session.commit()  # from here on the control plane answers 404 for it
    delete_prefix(store, row.key_prefix + "/")
    _evict_from_serving(request.app.state.settings, model_id, request.scope["state"]["request_id"])
    return ModelDeleted(id=model_id)


def _evict_from_serving(settings: Settings, adapter_id: str, request_id: str) -> None:
    """Free the adapter on every serving replica now rather than when the LRU gets to it.

    Best effort: requests for it already answer 404 here, and a replica that missed this
    evicts it in time; a serving outage must not fail the delete. Signed like inference
    (serving refuses an unsigned eviction): the signature covers this path, so this adapter id.
    """
    if not settings.serve_url or settings.serve_signing_key is None:
        return
    path = f"/internal/v1/adapters/{adapter_id}"
    signer = Signer(settings.serve_signing_key.get_secret_value())
    try:
        r = httpx.delete(settings.serve_url.rstrip("/") + quote(path), timeout=5,
                         headers=signer.headers("DELETE", path, request_id=request_id))
        if r.status_code != 200:
            log.warning("serving answered %s to evicting %s (request %s)", r.status_code, adapter_id, request_id)
    except httpx.HTTPError as exc:
        log.warning("could not evict %s from serving (request %s): %r", adapter_id, request_id, exc)


@router.get("/v1/adapters/{adapter_id}")
async def get_adapter(adapter_id: str, tenant: CurrentTenant, db: ReadDB) -> AdapterPublic:
    return AdapterPublic.of(await db.run(catalog.get_adapter_for_tenant, tenant_id=tenant.tenant_id,
                                         adapter_id=adapter_id, param="adapter_id"))


@router.get("/v1/adapters/{adapter_id}/files/{name}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_adapter_file(adapter_id: str, name: str, tenant: CurrentTenant, db: ReadDB,
                           store: StoreDep) -> StreamingResponse:
    adapter = await db.run(catalog.get_adapter_for_tenant, tenant_id=tenant.tenant_id,
                           adapter_id=adapter_id, param="adapter_id")
    entry = next((f for f in adapter.files if f["name"] == name), None)
    if entry is None:  # only names from the manifest: no path tricks reach the store
        raise NotFound(f"adapter {adapter_id} has no file {name!r}", param="name")
    stream = await run_in_threadpool(store.open, f"{adapter.key_prefix}/{name}")
    return StreamingResponse(iter_chunks(stream), media_type="application/octet-stream",
                             headers={"Content-Length": str(entry["bytes"])})
