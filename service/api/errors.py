"""The one place errors become HTTP: RFC 9457 problem+json with a stable ``code``.

Domain errors (service.errors), FastAPI's request validation errors and Starlette's HTTP errors
(unknown route, wrong method) all come out in the same shape, with an OpenAI-style ``error``
member so the official ``openai`` client shows the message. Anything unexpected is a 500 with
the request id and no traceback.
"""

from __future__ import annotations

import logging
import sys

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors as domain
from workers.storage import StorageError

PROBLEM_BASE = "https://lorafleet.dev/problems/"

STATUS_BY_ERROR: list[tuple[type[domain.DomainError], int]] = [
    (domain.BadRequest, 400),
    (domain.Unauthorized, 401),
    (domain.Forbidden, 403),
    (domain.NotFound, 404),
    (domain.Conflict, 409),  # InvalidTransition included
    (domain.PayloadTooLarge, 413),
    (domain.ValidationFailed, 422),
    (domain.TooManyRequests, 429),  # QuotaExceeded and RateLimited
    (domain.ServiceUnavailable, 503),
]

CODE_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
                  422: "validation_error", 429: "rate_limited", 503: "service_unavailable"}

log = logging.getLogger(__name__)


# RFC 9110 renamed 422; Python's HTTPStatus still has the old phrase.
TITLES = {422: "Unprocessable Content"}


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def problem_body(status: int, *, code: str, detail: str, param: str | None = None,
                 request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    openai_type = "invalid_request_error" if status < 500 else "server_error"
    return {
        "type": PROBLEM_BASE + code, "title": TITLES.get(status) or HTTPStatus(status).phrase, "status": status,
        "detail": detail, "code": code, "param": param, "request_id": request_id, **extra,
        "error": {"message": detail, "type": openai_type, "code": code, "param": param},
    }


def problem_response(status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def problem(request: Request, status: int, *, code: str, detail: str, param: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = problem_body(status, code=code, detail=detail, param=param,
                        request_id=request_id(request), **extra)
    return problem_response(status, body, headers)


def _status_of(exc: domain.DomainError) -> int:
    return next(status for cls, status in STATUS_BY_ERROR if isinstance(exc, cls))


def _field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'method', 'lora', 'hyperparameters', 'r') → 'method.lora.hyperparameters.r'."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    return ".".join(str(p) for p in parts) or str(loc[0] if loc else "")


async def _domain_error(request: Request, exc: domain.DomainError) -> JSONResponse:
    status = _status_of(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, domain.TooManyRequests) else None
    return problem(request, status, code=exc.code, detail=exc.message, param=exc.param,
                   headers=headers, **exc.extra)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    items = [{"param": _field_path(tuple(e.get("loc", ()))), "reason": e.get("msg", "invalid")}
             for e in exc.errors()]
    first = items[0] if items else {"param": None, "reason": "invalid request"}
    detail = f"{first['param']}: {first['reason']}" if first["param"] else first["reason"]
    if len(items) > 1:
        detail += f" (and {len(items) - 1} more)"
    return problem(request, 422, code="validation_error", detail=detail, param=first["param"],
                   errors=items)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = CODE_BY_STATUS.get(exc.status_code, "error")
    return problem(request, exc.status_code, code=code, detail=str(exc.detail),
                   headers=getattr(exc, "headers", None))


# A database (or object store) that is down, failing over or out of connections answers 503 with
# Retry-After, so clients (our SDK, workers) retry instead of giving up. Seconds to wait:
RETRY_AFTER_S = 2
# Lost connections, refused connects, statement timeouts (QueryCanceled is an OperationalError),
# an exhausted pool: all pass. IntegrityError, DataError and the like are answers, not outages.
DB_OUTAGE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)


def is_db_outage(exc: BaseException | None) -> bool:
    return isinstance(exc, DB_OUTAGE_ERRORS) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def db_unavailable(scope: dict[str, Any], exc: BaseException) -> JSONResponse:
    rid = scope.get("state", {}).get("request_id")
    # The driver's text names hosts and users: for our log (with the request id), not the client.
    log.warning("database unavailable on %s (request %s): %s: %s", scope.get("path"), rid,
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return problem_response(503, problem_body(503, code="database_unavailable", request_id=rid,
                                              detail="the database is unavailable; try again shortly"),
                            headers={"Retry-After": str(RETRY_AFTER_S)})


def internal_error(scope: dict[str, Any], exc: BaseException | None = None) -> JSONResponse:
    """The catch-all 500 (used by the request middleware, which sees every unhandled error).

    A database outage raised outside a route (the idempotency middleware, a dependency's
    teardown) is still a 503: the middleware calls this inside its ``except``, so the error is
    the one being handled.
    """
    exc = exc if exc is not None else sys.exc_info()[1]
    if is_db_outage(exc):
        return db_unavailable(scope, exc)
    rid = scope.get("state", {}).get("request_id")
    return problem_response(500, problem_body(500, code="internal_error", request_id=rid,
                                              detail=f"internal error; quote request id {rid}"))


async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
    # The store's own message names endpoints, buckets and keys: for the log, not the client.
    log.warning("object store error on %s: %s", request.url.path, exc)
    return problem(request, 503, code="storage_unavailable",
                   detail="the object store is unavailable; try again later",
                   headers={"Retry-After": str(RETRY_AFTER_S)})


async def _db_error(request: Request, exc: Exception) -> JSONResponse:
    return db_unavailable(request.scope, exc)


async def _data_error(request: Request, exc: DataError) -> JSONResponse:
    # The database refused a value the schema let through (e.g. a NUL character, which
    # PostgreSQL text cannot hold): the request is at fault, and nothing was written.
    return problem(request, 422, code="validation_error",
                   detail="a value in the request cannot be stored (NUL character or out of range)")


def install(app: FastAPI) -> None:
    app.add_exception_handler(StorageError, _storage_error)
    app.add_exception_handler(DataError, _data_error)
    for cls in DB_OUTAGE_ERRORS:  # other invalidated-connection errors: see internal_error
        app.add_exception_handler(cls, _db_error)
    app.add_exception_handler(domain.DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
