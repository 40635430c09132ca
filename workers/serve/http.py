"""The OpenAI-compatible HTTP ingress of a serving replica (FastAPI; runs under plain uvicorn).

Routes (docs/API.md, Inference): POST /v1/chat/completions and /v1/completions (SSE when
``stream``), DELETE /internal/v1/adapters/{id} (evict), GET /internal/v1/stats, GET /healthz.
``backend`` is a ``ServingFront`` in this process, or the Ray Serve app's handle wrapper: both
yield dicts (``problem`` / ``response`` / ``chunk``), turned into HTTP here and only here.

Every route but /healthz answers only requests the control plane signed (``workers.signing``):
the signature is checked before the body is parsed, the routing field read or the adapter cache
touched; anything else is a 401 ``invalid_signature``. The request id is the signed one, never a
caller's ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from workers.serve.front import problem
from workers.signing import Claims, SignatureError, Verifier

PROBLEM_JSON = "application/problem+json"
# Signed bodies come from the control plane, which bounds them (1 MiB by default); this only
# stops a caller without a key from making us buffer an unbounded body before the 401.
MAX_BODY_BYTES = int(os.environ.get("LORAFLEET_SERVE_MAX_BODY_BYTES", str(8 * 1024 * 1024)))
# The whole body must arrive within this: a caller trickling bytes (or stalling) would otherwise
# hold a connection and a buffer for as long as it likes; uvicorn has no body timeout of its own.
BODY_READ_TIMEOUT_S = float(os.environ.get("LORAFLEET_SERVE_BODY_READ_TIMEOUT_S", "30"))

log = logging.getLogger("lorafleet.serve.http")


class Backend(Protocol):
    def run(self, kind: str, body: dict) -> AsyncIterator[dict]: ...
    async def evict(self, adapter_id: str) -> bool: ...
    async def stats(self) -> dict: ...


def _problem_response(body: dict, request_id: str) -> JSONResponse:
    body = {**body, "request_id": request_id}
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_JSON)


async def _sse(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        yield f"data: {json.dumps(first['chunk'])}\n\n"
        async for item in rest:
            # A failure after the first byte cannot change the status: it goes in the stream.
            payload = item["chunk"] if "chunk" in item else {"error": item["problem"]["error"]}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await rest.aclose()  # the client left: abort the generation


class Refused(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Refused(413, "payload_too_large", "the body is too large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise Refused(413, "payload_too_large", "the body is too large")
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(408, "request_timeout", f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s") from None
    except ClientDisconnect:
        # Nobody is left to read the answer; a 400 rather than an unhandled exception (a 500
        # in our logs and metrics for what is the caller's doing).
        raise Refused(400, "client_disconnected", "the client left before sending its whole body") from None
    return b"".join(chunks)


def create_app(backend: Backend, verifier: Verifier | None = None) -> FastAPI:
    """``verifier``: default, one over LORAFLEET_SERVE_SIGNING_KEY[_PREVIOUS] of this process
    (with neither set, every signed route answers 401: closed, never open)."""
    if verifier is None:
        verifier = Verifier.from_env()
        if not verifier.configured:
            log.warning("no signing key (LORAFLEET_SERVE_SIGNING_KEY): every request will be refused")
    app = FastAPI(title="LoRA Fleet serving", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        # Our own id until a signature vouches for the control plane's (``signed`` below).
        request.state.request_id = f"req_{uuid.uuid4().hex[:16]}"
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return _problem_response(problem(exc.status, exc.code, exc.detail), request.state.request_id)

    async def signed(request: Request) -> Claims:
        """Headers first (no body read for an unsigned caller), then the MAC over the body."""
        try:
            claims = verifier.check_headers(request.headers)
            body = await _read_body(request)
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            verifier.verify(claims, request.method, path, body)
        except SignatureError as exc:
            log.warning("refused %s %s: %s (%s)", request.method, request.url.path, exc, exc.reason)
            if exc.reason == "busy":
                raise Refused(503, "serving_busy", "too many requests in flight; retry") from None
            raise Refused(401, "invalid_signature", "requests to serving must be signed by the "
                          "control plane") from None
        request.state.request_id = claims.request_id
        request.state.body = body
        return claims

    signed_by_control_plane = Depends(signed)

    async def answer(kind: str, request: Request):
        rid = request.state.request_id
        try:
            body = json.loads(request.state.body)
        except ValueError:
            return _problem_response(problem(400, "invalid_json", "the body is not valid JSON"), rid)
        if not isinstance(body, dict):
            return _problem_response(problem(400, "invalid_json", "the body must be a JSON object"), rid)
        items = backend.run(kind, body)
        first = await anext(items)
        if "problem" in first:
            await items.aclose()
            return _problem_response(first["problem"], rid)
        if "response" in first:
            await items.aclose()
            return JSONResponse(first["response"])
        return StreamingResponse(_sse(first, items), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, _: Claims = signed_by_control_plane):
        return await answer("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request, _: Claims = signed_by_control_plane):
        return await answer("completion", request)

    @app.delete("/internal/v1/adapters/{adapter_id}")
    async def evict_adapter(adapter_id: str, _: Claims = signed_by_control_plane):
        return {"id": adapter_id, "evicted": await backend.evict(adapter_id)}

    @app.get("/internal/v1/stats")
    async def stats(_: Claims = signed_by_control_plane):
        return await backend.stats()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app
