"""``Idempotency-Key`` on every POST: a retry with the same key and body gets the first response.

An ASGI middleware, because it must see the raw body and the finished response of any route.
Keys are scoped per caller (tenant, admin, or job for worker routes). The body hash ignores the
multipart boundary, which clients pick at random per attempt. Server errors, auth failures and
429s are not stored: retrying those should really retry.
"""

from __future__ import annotations

import hashlib
import re

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import PrincipalCache
from service.api.errors import problem_body, problem_response
from service.db.models import IdempotencyKey
from service.ids import now
from service.security import bearer, is_admin_token, is_valid_job_token
from service.settings import Settings
from service.tenants.repository import hash_key

_NOT_STORED = {401, 403, 429}
_INTERNAL = re.compile(r"^/internal/v1/jobs/([^/]+)/")
MAX_KEY_LENGTH = 255


class _BodyHasher:
    """sha256 over method, path and body, with the multipart boundary cut out across chunks."""

    def __init__(self, scope: Scope, headers: Headers):
        self._sha = hashlib.sha256(f"{scope['method']} {scope['path']}\n".encode())
        match = re.search(r"boundary=\"?([^\";]+)", headers.get("content-type", ""))
        self._boundary = match.group(1).encode() if match else None
        self._tail = b""
        self.complete = False

    def update(self, chunk: bytes, more: bool) -> None:
        if self._boundary is None:
            self._sha.update(chunk)
        else:
            data = (self._tail + chunk).replace(self._boundary, b"")
            keep = 0 if not more else len(self._boundary) - 1
            self._tail = data[len(data) - keep:] if keep else b""
            self._sha.update(data[:len(data) - keep] if keep else data)
        self.complete = not more

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, factory: sessionmaker[Session],
                 principals: PrincipalCache):
        self.app, self.settings, self.factory, self.principals = app, settings, factory, principals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        key = headers.get("idempotency-key") if headers is not None else None
        if scope["type"] != "http" or scope["method"] != "POST" or not key:
            await self.app(scope, receive, send)
            return
        if len(key) > MAX_KEY_LENGTH:
            await self._reject(scope, receive, send, "idempotency_key_invalid",
                               f"Idempotency-Key is longer than {MAX_KEY_LENGTH} characters")
            return
        caller = await run_in_threadpool(self._caller, scope, headers)
        if caller is None:  # unauthenticated: let the route answer 401/403, remember nothing
            await self.app(scope, receive, send)
            return
        stored = await run_in_threadpool(self._load, caller, key)
        hasher = _BodyHasher(scope, headers)
        if stored is not None:
            while not hasher.complete:
                message = await receive()
                hasher.update(message.get("body", b""), message.get("more_body", False))
            if hasher.hexdigest() != stored.request_hash:
                await self._reject(scope, receive, send, "idempotency_key_reused",
                                   "this Idempotency-Key was used with a different request body")
                return
            response = Response(stored.body, status_code=stored.status_code,
                                media_type=stored.content_type,
                                headers={"Idempotent-Replayed": "true"})
            await response(scope, receive, send)
            return
        await self._first_attempt(scope, receive, send, caller, key, hasher)

    async def _first_attempt(self, scope: Scope, receive: Receive, send: Send, caller: str,
                             key: str, hasher: _BodyHasher) -> None:
        status, content_type, body, streaming = 0, None, bytearray(), False

        async def hashing_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                hasher.update(message.get("body", b""), message.get("more_body", False))
            return message

        async def capturing_send(message: Message) -> None:
            nonlocal status, content_type, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = Headers(raw=message.get("headers", [])).get("content-type")
                streaming = (content_type or "").startswith(("text/event-stream", "application/octet-stream"))
            elif message["type"] == "http.response.body" and not streaming:
                body.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, hashing_receive, capturing_send)
        # Only a response to the whole body can be replayed for that body.
        if hasher.complete and not streaming and status < 500 and status not in _NOT_STORED:
            await run_in_threadpool(self._save, caller, key, hasher.hexdigest(), status,
                                    content_type, bytes(body))

    def _caller(self, scope: Scope, headers: Headers) -> str | None:
        token = bearer(headers.get("authorization"))
        if token is None:
            return None
        internal = _INTERNAL.match(scope["path"])
        if internal:
            job_id = internal.group(1)
            return f"job:{job_id}"[:64] if is_valid_job_token(token, job_id, self.settings) else None
        if scope["path"].startswith("/v1/admin/"):
            return "admin" if is_admin_token(token, self.settings) else None
        key_hash = hash_key(token)
        hit, principal = self.principals.cached(key_hash)
        if not hit:
            principal = self.principals.load(key_hash)
        return principal.tenant_id if principal is not None else None

    def _load(self, caller: str, key: str) -> IdempotencyKey | None:
        with self.factory() as session:
            return session.get(IdempotencyKey, (caller, key))

    def _save(self, caller: str, key: str, request_hash: str, status: int,
              content_type: str | None, body: bytes) -> None:
        with self.factory() as session:
            session.add(IdempotencyKey(scope=caller, key=key, request_hash=request_hash,
                                       status_code=status, content_type=content_type,
                                       body=body.decode("utf-8", errors="replace"), created_at=now()))
            try:
                session.commit()
            except IntegrityError:  # a concurrent first attempt with the same key stored first
                session.rollback()

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, code: str, detail: str) -> None:
        body = problem_body(422, code=code, detail=detail, param="Idempotency-Key",
                            request_id=scope.get("state", {}).get("request_id"))
        await problem_response(422, body)(scope, receive, send)
