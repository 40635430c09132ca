"""ASGI middleware, outermost first: request ids and metrics (and the catch-all 500), then the
authentication gate, then the body guard.

Pure ASGI rather than BaseHTTPMiddleware: it is on every request's hot path and must not buffer
streamed responses (file downloads, SSE from the serving side).

Hostile input must cost nothing (issue 10): the gate authenticates from the headers alone, so a
request without a valid key is answered before a byte of its body is read, and the guard counts
body bytes while they are read (Content-Length is checked first, but not trusted), answering 413
past the limit and 408 when the client stalls mid-body.
"""

from __future__ import annotations

import logging
import secrets
import time

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors as domain
from service.api.auth import FailedAuthLimiter, PrincipalCache, authenticate_tenant, client_address
from service.api.errors import STATUS_BY_ERROR, internal_error, problem_body, problem_response
from service.api.metrics import ApiMetrics
from service.security import bearer, is_admin_token
from service.settings import Settings

log = logging.getLogger("lorafleet.api")

# Metrics status of a request whose client went away before any answer (nginx's convention).
CLIENT_CLOSED = 499
UPLOAD_PATH = "/v1/files"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        started, status = time.perf_counter(), CLIENT_CLOSED
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing broke
            log.info("client disconnected during %s %s (request %s)", scope["method"], scope["path"], rid)
        except Exception:
            status = 500
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], rid)
            if not response_started:
                await internal_error(scope)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - started)


def domain_problem(scope: Scope, exc: domain.DomainError) -> Response:
    """The problem+json answer of a domain error raised outside a route."""
    status = next(s for cls, s in STATUS_BY_ERROR if isinstance(exc, cls))
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, domain.TooManyRequests) else None
    body = problem_body(status, code=exc.code, detail=exc.message, param=exc.param,
                        request_id=scope.get("state", {}).get("request_id"), **exc.extra)
    return problem_response(status, body, headers)


class AuthGate:
    """Authenticates every ``/v1`` request from its headers, before its body is read.

    Tenant routes need a tenant key, ``/v1/admin`` the admin token; failures count against the
    client address (``FailedAuthLimiter``). The tenant found is left in the request state, so
    the route's ``CurrentTenant`` dependency does not look it up again. Internal routes (job
    tokens) and health probes are not gated here: their dependencies authenticate, and the body
    guard bounds what such a request can send.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings, principals: PrincipalCache,
                 failures: FailedAuthLimiter):
        self.app, self.settings, self.principals, self.failures = app, settings, principals, failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        token = bearer(Headers(scope=scope).get("authorization"))
        address = client_address(scope)
        try:
            if path == "/v1/admin" or path.startswith("/v1/admin/"):
                self._check_admin(token, address)
            else:
                scope.setdefault("state", {})["principal"] = await authenticate_tenant(
                    self.principals, self.failures, token, address, self.settings)
        except domain.DomainError as exc:
            await domain_problem(scope, exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_admin(self, token: str | None, address: str) -> None:
        if token is None:
            raise domain.Unauthorized("missing admin token")
        # The budget first, even for the right token: otherwise a guesser past its budget would
        # still learn which guess is right (200 vs 429) at full speed. A blocked address waits
        # for the window like anyone else; operators reach /v1/admin from their own address.
        self.failures.check(address)
        if is_admin_token(token, self.settings):  # constant time, no lookup
            return
        self.failures.failed(address)
        raise domain.Forbidden("not an admin token")


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so FastAPI passes it on while reading a body."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyReadTimeout(HTTPException):
    def __init__(self, timeout_s: float):
        super().__init__(408, f"no request body bytes arrived for {timeout_s:g} s")


class BodyGuard:
    """A size limit counted while the body is read, and a read timeout between its chunks.

    The limit is ``max_body_bytes`` everywhere but the upload route (``max_upload_bytes`` plus
    room for the multipart envelope). Past it, or when the client stalls, reading stops and the
    answer is 413/408 (problem+json); uvicorn then closes the connection, as the rest of the
    body was never read.
    """

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int, timeout_s: float):
        self.app, self.limit, self.upload_limit, self.timeout_s = app, limit, upload_limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if (scope["method"], scope["path"]) == ("POST", UPLOAD_PATH) else self.limit
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            await self._answer(scope, receive, send, BodyTooLarge(limit))
            return
        size, body_done, response_started = 0, False, False

        async def guarded_receive() -> Message:
            nonlocal size, body_done
            if body_done:  # after the body, receive waits for a disconnect: no timeout there
                return await receive()
            try:
                with anyio.fail_after(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyReadTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, watching_send)
        except (BodyTooLarge, BodyReadTimeout) as exc:
            # Raised outside a route (a middleware reading ahead); inside one, the exception
            # handlers have answered already.
            if not response_started:
                await self._answer(scope, receive, send, exc)

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send, exc: HTTPException) -> None:
        code = "payload_too_large" if exc.status_code == 413 else "request_timeout"
        body = problem_body(exc.status_code, code=code, detail=exc.detail,
                            request_id=scope.get("state", {}).get("request_id"))
        await problem_response(exc.status_code, body, {"Connection": "close"})(scope, receive, send)
