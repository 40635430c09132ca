"""The OpenAI-compatible HTTP ingress of a serving replica (FastAPI; runs under plain uvicorn).

Routes (docs/API.md, Inference): POST /v1/chat/completions and /v1/completions (SSE when
``stream``), DELETE /internal/v1/adapters/{id} (evict), GET /internal/v1/stats, GET /healthz.
``backend`` is a ``ServingFront`` in this process, or the Ray Serve app's handle wrapper: both
yield dicts (``problem`` / ``response`` / ``chunk``), turned into HTTP here and only here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from workers.serve.front import problem

PROBLEM_JSON = "application/problem+json"


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


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(title="LoRA Fleet serving", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex[:16]}"
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id
        return response

    async def answer(kind: str, request: Request):
        rid = request.state.request_id
        try:
            body = await request.json()
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
    async def chat_completions(request: Request):
        return await answer("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer("completion", request)

    @app.delete("/internal/v1/adapters/{adapter_id}")
    async def evict_adapter(adapter_id: str):
        return {"id": adapter_id, "evicted": await backend.evict(adapter_id)}

    @app.get("/internal/v1/stats")
    async def stats():
        return await backend.stats()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app
