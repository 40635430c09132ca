"""OpenAI-compatible inference, proxied to the serving application.

Ownership is checked here, not in the serving layer: ``model`` must be a base model or one of
this tenant's adapters (never silently the base model for an unknown adapter). The forwarded
body carries a ``lorafleet`` field that only the control plane sets.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from service.api.deps import CurrentTenant, ReadDatabase, ReadDB
from service.catalog import repository as catalog
from service.db.models import Adapter, BaseModelRow
from service.errors import ServiceUnavailable, ValidationFailed

router = APIRouter(prefix="/v1", tags=["inference"])

# Response headers that describe the upstream connection, not the body we pass on.
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}

_OPENAI_BODY = Body(openapi_examples={"chat": {"value": {
    "model": "lorafleet/tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}}})


def _routing(session: Session, *, tenant_id: str, model: str) -> dict[str, Any]:
    """The ``lorafleet`` field: a base model, or this tenant's adapter (anything else: NotFound)."""
    base = session.get(BaseModelRow, model)
    if base is not None:
        return {"adapter": None, "base_model": {"id": base.id, "uri": base.source_uri}}
    adapter: Adapter = catalog.get_adapter_for_tenant(session, tenant_id=tenant_id, adapter_id=model)
    base = catalog.get_base_model(session, model_id=adapter.base_model_id)
    return {"adapter": {"id": adapter.id, "prefix": adapter.key_prefix, "base_model_id": base.id},
            "base_model": {"id": base.id, "uri": base.source_uri}}


async def _forward(request: Request, db: ReadDatabase, path: str, tenant_id: str,
                   body: dict[str, Any]) -> Response:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationFailed("model is required", param="model")
    routing = await db.run(_routing, tenant_id=tenant_id, model=model)
    serve_url = request.app.state.settings.serve_url
    if not serve_url:
        raise ServiceUnavailable("no serving application is configured (LORAFLEET_SERVE_URL)",
                                 code="serving_unavailable")
    payload = {k: v for k, v in body.items() if k != "lorafleet"} | {"lorafleet": routing}
    client: httpx.AsyncClient = request.app.state.http
    upstream_request = client.build_request("POST", serve_url.rstrip("/") + path, json=payload,
                                            headers={"x-request-id": request.scope["state"]["request_id"]})
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"serving application unreachable: {exc.__class__.__name__}",
                                 code="serving_unavailable") from None
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 headers=headers, background=BackgroundTask(upstream.aclose))
    content = await upstream.aread()
    await upstream.aclose()
    return Response(content, status_code=upstream.status_code, headers=headers)


@router.post("/chat/completions", response_class=JSONResponse)
async def chat_completions(request: Request, tenant: CurrentTenant, db: ReadDB,
                           body: dict[str, Any] = _OPENAI_BODY) -> Response:
    return await _forward(request, db, "/v1/chat/completions", tenant.tenant_id, body)


@router.post("/completions", response_class=JSONResponse)
async def completions(request: Request, tenant: CurrentTenant, db: ReadDB,
                      body: dict[str, Any] = _OPENAI_BODY) -> Response:
    return await _forward(request, db, "/v1/completions", tenant.tenant_id, body)
