"""An OpenAPI document that tells the truth about errors, for every route, in one place.

Every error is answered as ``application/problem+json`` with one ``Problem`` schema (see
service.api.errors). FastAPI documents only a 422 of its own shape (``application/json``), so the
generated document is post-processed here: each operation gets the error statuses it can answer,
derived from what guards it (the auth gate by path prefix, the body guard and idempotency on
requests with bodies, validation on routes with parameters), and every 4xx/5xx it declares is
rewritten to the problem schema. A route declares ``responses=`` only for what is special to it
(e.g. a 200 that is not JSON); new routes get the rest without doing anything.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.schemas.common import Problem

PROBLEM_REF = "#/components/schemas/Problem"
_DESCRIPTIONS = {
    400: "Malformed request", 401: "Missing or invalid credentials", 403: "Not allowed",
    404: "No such resource (or another tenant's)", 408: "The request body stalled",
    409: "Conflict with the resource's state, or the Idempotency-Key is in use",
    413: "Request body too large", 422: "Invalid input", 429: "Rate limited (see Retry-After)",
    500: "The serving application failed on this request (adapter_load_failed, generation_failed)",
    503: "A dependency (database, object store, serving) is unavailable; retry (see Retry-After)",
}
_BODY_METHODS = {"post", "put", "patch"}
PROXIED = {"/v1/chat/completions", "/v1/completions"}


def _statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses one operation can answer."""
    statuses = {503}  # database or object store down
    has_body = method in _BODY_METHODS
    if operation.get("parameters") or "requestBody" in operation or has_body:
        statuses |= {400, 422}
    if has_body:  # body guard, idempotency (in flight / reused key), resources named in the body
        statuses |= {404, 408, 409, 413}
    if "{" in path:
        statuses.add(404)
    if method == "delete":
        statuses.add(409)
    if path.startswith("/v1/"):  # the auth gate: key or admin token, failed-auth limit
        statuses |= {401, 403, 429}
    if path in PROXIED:  # serving's own per-request failures are passed on
        statuses.add(500)
    elif path.startswith("/internal/"):  # job tokens; a run that is over is a 409
        statuses |= {401, 409}
    return statuses


def _streams(operation: dict[str, Any], schemas: dict[str, Any]) -> bool:
    """Whether the request body has a ``stream`` flag (OpenAI-style: the answer is then SSE)."""
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    if ref:
        schema = schemas.get(ref.rsplit("/", 1)[-1], {})
    return "stream" in schema.get("properties", {})


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": PROBLEM_REF}}}}


def document_problems(app: FastAPI) -> None:
    """Make ``app.openapi()`` document problem+json errors on every operation."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(problem.pop("$defs", {}))
        schemas["Problem"] = problem
        for path, item in doc.get("paths", {}).items():
            for method, operation in item.items():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                for status in _statuses(path, method, operation):
                    responses.setdefault(str(status), _problem(_DESCRIPTIONS[status]))
                for status, response in responses.items():
                    if status[:1] in "45":  # FastAPI's own 422, a route's declared errors
                        responses[status] = _problem(response.get("description") or "Error")
                if _streams(operation, schemas) and "200" in responses:  # stream=true: SSE
                    responses["200"].setdefault("content", {})["text/event-stream"] = {
                        "schema": {"description": "Server-sent events: one JSON chunk per event, then [DONE]"}}
                operation["responses"] = dict(sorted(responses.items()))
        # FastAPI's validation-error shapes are never served (our 422 is a Problem).
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
