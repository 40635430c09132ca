"""OpenAI-compatible inference, proxied to the serving application.

Ownership is checked here, not in the serving layer: ``model`` must be a base model or one of
this tenant's adapters (never silently the base model for an unknown adapter). The forwarded
body carries a ``lorafleet`` field that only the control plane sets, and every forwarded request
is signed (``workers.signing``): serving refuses anything else.

Fairness: one tenant holds at most ``tenant_max_concurrent_inference`` requests (streams until
they end) in this process (429 past it), and a request waits at most ``serve_pool_timeout_s``
for a connection to serving (503), so one tenant's open streams cannot hold everyone's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from service.api.deps import CurrentTenant, ReadDatabase, ReadDB
from service.api.errors import problem
from service.api.schemas.inference import CHAT_BODY, COMPLETION_BODY, ChatCompletionRequest, CompletionRequest
from service.catalog import repository as catalog
from service.db.models import Adapter, BaseModelRow
from service.errors import ServiceUnavailable, TooManyRequests, ValidationFailed
from service.exports.create import MAX_BLEND_ADAPTERS, blend_inputs
from service.settings import Settings
from workers.signing import Signer

router = APIRouter(prefix="/v1", tags=["inference"])
log = logging.getLogger(__name__)

# Response headers that describe the upstream connection or the upstream server, not the body we
# pass on: ours (server, date, x-request-id) are set once, by uvicorn and our middleware.
_DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive",
                    "server", "date", "x-request-id"}

def serve_signer(settings: Settings) -> Signer:
    """The signer for requests to serving; 503 when none is configured (serving would refuse)."""
    if not settings.serve_url:
        raise ServiceUnavailable("no serving application is configured (LORAFLEET_SERVE_URL)",
                                 code="serving_unavailable")
    if settings.serve_signing_key is None:
        log.error("LORAFLEET_SERVE_SIGNING_KEY is not set: inference cannot be signed")
        raise ServiceUnavailable("the serving application is not configured", code="serving_unavailable")
    return Signer(settings.serve_signing_key.get_secret_value())


class InflightLimits:
    """Open inference requests per tenant in this process (one event loop: no lock needed)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, {}

    def acquire(self, tenant_id: str) -> Lease:
        if self.open.get(tenant_id, 0) >= self.limit:
            raise TooManyRequests(f"more than {self.limit} inference requests open at once; retry "
                                  "when one finishes", retry_after=1, code="too_many_concurrent_requests")
        self.open[tenant_id] = self.open.get(tenant_id, 0) + 1
        return Lease(self, tenant_id)


class Lease:
    def __init__(self, limits: InflightLimits, tenant_id: str):
        self._limits, self._tenant, self._held = limits, tenant_id, True

    def release(self) -> None:
        """Idempotent: the stream's end and the response's background task may both call it."""
        if self._held:
            self._held = False
            left = self._limits.open[self._tenant] - 1
            if left:
                self._limits.open[self._tenant] = left
            else:
                del self._limits.open[self._tenant]


def _limits(request: Request) -> InflightLimits:
    state = request.app.state
    if getattr(state, "inference_limits", None) is None:
        state.inference_limits = InflightLimits(state.settings.tenant_max_concurrent_inference)
    return state.inference_limits


class BlendWeight(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Annotated[str, Field(min_length=1, max_length=300)]
    weight: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = 1.0


# A live weighted blend (docs/API.md): ``adapters``, several of the tenant's LoRA adapters.
_BLEND = TypeAdapter(Annotated[list[BlendWeight], Field(min_length=1, max_length=MAX_BLEND_ADAPTERS)])


def _parse_blend(raw: Any) -> list[BlendWeight] | None:
    if raw is None:
        return None
    try:
        return _BLEND.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        raise ValidationFailed(f"adapters{loc}: {err['msg']}", param=f"adapters{loc}") from None


def _routing(session: Session, *, tenant_id: str, model: str,
             blend: list[BlendWeight] | None = None) -> dict[str, Any]:
    """The ``lorafleet`` field: a base model, or this tenant's adapter (anything else: NotFound);
    with ``blend``, every adapter of the blend, each checked the same way."""
    if blend is not None:
        return _blend_routing(session, tenant_id=tenant_id, model=model, blend=blend)
    base = session.get(BaseModelRow, model)
    if base is not None:
        return {"adapter": None, "base_model": {"id": base.id, "uri": base.source_uri}}
    adapter: Adapter = catalog.get_adapter_for_tenant(session, tenant_id=tenant_id, adapter_id=model)
    base = catalog.get_base_model(session, model_id=adapter.base_model_id)
    return {"adapter": {"id": adapter.id, "prefix": adapter.key_prefix, "base_model_id": base.id},
            "base_model": {"id": base.id, "uri": base.source_uri}}


def _blend_routing(session: Session, *, tenant_id: str, model: str, blend: list[BlendWeight]) -> dict[str, Any]:
    adapters = blend_inputs(session, tenant_id=tenant_id, refs=[(b.model, b.weight) for b in blend])
    if model not in {a.id for a in adapters}:
        raise ValidationFailed("with adapters, model must be one of them", param="model")
    routing = _routing(session, tenant_id=tenant_id, model=model)
    routing["blend"] = [{"id": a.id, "prefix": a.key_prefix, "weight": b.weight}
                        for a, b in zip(adapters, blend, strict=True)]
    return routing


# Serving broke off a stream: the status is long sent, so the error goes in the stream, as the
# serving app itself reports a failure after the first byte.
_BROKEN_STREAM = ("data: " + json.dumps({"error": {
    "message": "the serving application stopped answering; retry", "type": "server_error",
    "code": "serving_unavailable", "param": None}}) + "\n\n").encode()


async def _relay(upstream: httpx.Response, lease: Lease, request_id: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        log.warning("serving broke off a stream (request %s): %r", request_id, exc)
        yield _BROKEN_STREAM
    finally:  # the stream ended or the client left: free the connection and the tenant's slot
        await upstream.aclose()
        lease.release()


def _unavailable(request: Request, code: str, detail: str) -> Response:
    return problem(request, 503, code=code, detail=detail, headers={"Retry-After": "1"})


async def _forward(request: Request, db: ReadDatabase, path: str, tenant_id: str,
                   body: dict[str, Any]) -> Response:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationFailed("model is required", param="model")
    settings: Settings = request.app.state.settings
    signer = serve_signer(settings)
    routing = await db.run(_routing, tenant_id=tenant_id, model=model, blend=_parse_blend(body.get("adapters")))
    payload = {k: v for k, v in body.items() if k not in ("lorafleet", "adapters")} | {"lorafleet": routing}
    content = json.dumps(payload, separators=(",", ":")).encode()
    rid = request.scope["state"]["request_id"]
    headers = {"content-type": "application/json",
               **signer.headers("POST", path, content, tenant=tenant_id, request_id=rid)}
    client: httpx.AsyncClient = request.app.state.http
    timeout = httpx.Timeout(settings.serve_timeout_s, connect=10.0, pool=settings.serve_pool_timeout_s)
    upstream_request = client.build_request("POST", settings.serve_url.rstrip("/") + path,
                                            content=content, headers=headers, timeout=timeout)
    lease = _limits(request).acquire(tenant_id)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.PoolTimeout:
        lease.release()
        log.warning("no free connection to serving within %.1fs (request %s)", settings.serve_pool_timeout_s, rid)
        return _unavailable(request, "serving_busy", "the serving application is busy; retry shortly")
    except httpx.HTTPError as exc:
        lease.release()
        log.warning("serving unreachable (request %s): %r", rid, exc)
        return _unavailable(request, "serving_unavailable", "the serving application is unreachable")
    except BaseException:
        lease.release()
        raise
    if upstream.status_code == 401:
        # Serving refused our signature (keys that differ after a botched rotation, or clocks
        # further apart than its allowed skew): our fault, not the tenant's credentials, so
        # never pass its 401 on.
        await upstream.aclose()
        lease.release()
        log.error("serving refused the control plane's signature (request %s): check that "
                  "LORAFLEET_SERVE_SIGNING_KEY matches on API and serving, and that their clocks "
                  "agree within 30 s (NTP)", rid)
        return _unavailable(request, "serving_unavailable", "the serving application is unavailable")
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_HEADERS}
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        return StreamingResponse(_relay(upstream, lease, rid), status_code=upstream.status_code,
                                 headers=headers, background=BackgroundTask(_close, upstream, lease))
    try:
        content = await upstream.aread()
    except httpx.HTTPError as exc:
        log.warning("serving failed mid-response (request %s): %r", rid, exc)
        return _unavailable(request, "serving_unavailable", "the serving application failed to answer")
    finally:
        await upstream.aclose()
        lease.release()
    return Response(content, status_code=upstream.status_code, headers=headers)


async def _close(upstream: httpx.Response, lease: Lease) -> None:
    """A stream that never started still frees its connection and slot."""
    await upstream.aclose()
    lease.release()


@router.post("/chat/completions", response_class=JSONResponse)
async def chat_completions(request: Request, tenant: CurrentTenant, db: ReadDB,
                           body: ChatCompletionRequest = CHAT_BODY) -> Response:
    return await _forward(request, db, "/v1/chat/completions", tenant.tenant_id, body.forwarded())


@router.post("/completions", response_class=JSONResponse)
async def completions(request: Request, tenant: CurrentTenant, db: ReadDB,
                      body: CompletionRequest = COMPLETION_BODY) -> Response:
    return await _forward(request, db, "/v1/completions", tenant.tenant_id, body.forwarded())
