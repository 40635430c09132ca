"""``Idempotency-Key`` on every POST: a retry with the same key and body gets the first response.

An ASGI middleware, because it must see the raw body and the finished response of any route.
Keys are scoped per caller (tenant, admin, or job for worker routes). The body hash ignores the
multipart boundary, which clients pick at random per attempt.

The key is reserved before the handler runs: a row with status 0 ("in flight"), inserted in its
own transaction, so the primary key decides which of two concurrent attempts runs; the other
gets 409 ``idempotency_key_in_flight`` with Retry-After and, retrying, the stored replay. The
body is therefore read (in memory, at most ``max_body_bytes``: the body guard outside bounds it)
before the handler sees it; an upload longer than that is reserved when its last byte arrives,
still before the route acts, so it is spooled once (by the route) and never held here. The answer is
stored before its last byte is sent, so a client that retries after the response never races
it. Server errors, auth failures, 429s and streams are not stored: their reservation is deleted
so a retry really retries; one older than ``IN_FLIGHT_TIMEOUT_S`` was abandoned by a crash and
is taken over.

Records expire after ``idempotency_ttl_s`` (24 h): an older one no longer answers, and a
background task in the app's lifespan (``purge_periodically``) deletes them in bounded batches.
Inference calls (``NOT_REMEMBERED``) are never recorded: a completion is no resource, its body
can be large, and a retry simply runs it again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable

import anyio
from sqlalchemy import delete, select, tuple_, update
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
IN_FLIGHT = 0  # status_code of a reserved key whose first attempt is still running
IN_FLIGHT_TIMEOUT_S = 60
NOT_REMEMBERED = frozenset({"/v1/chat/completions", "/v1/completions"})
PURGE_BATCH = 1000
log = logging.getLogger(__name__)


class _BodyHasher:
    """sha256 over method, path and body, with the multipart boundary cut out across chunks."""

    def __init__(self, scope: Scope, headers: Headers):
        self._sha = hashlib.sha256(f"{scope['method']} {scope['path']}\n".encode())
        match = re.search(r"boundary=\"?([^\";]+)", headers.get("content-type", ""))
        self._boundary = match.group(1).encode() if match else None
        self._tail = b""

    def update(self, chunk: bytes, more: bool) -> None:
        if self._boundary is None:
            self._sha.update(chunk)
        else:
            data = (self._tail + chunk).replace(self._boundary, b"")
            keep = 0 if not more else len(self._boundary) - 1
            self._tail = data[len(data) - keep:] if keep else b""
            self._sha.update(data[:len(data) - keep] if keep else data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _KeyHeld(Exception):
    """Raised from ``receive`` when the last byte of a long body shows the key is not ours."""

    def __init__(self, stored: IdempotencyKey, request_hash: str):
        self.stored, self.request_hash = stored, request_hash


class _Body:
    """The request body read ahead of the handler (in memory, at most ``threshold`` bytes), hashed,
    then handed on unchanged. A longer body (only the upload route allows one) is not held: the
    rest passes through to the handler, hashed on the way, and ``at_end`` runs when its last
    chunk arrives, before the handler sees that chunk."""

    def __init__(self, scope: Scope, headers: Headers, threshold: int):
        self.hasher = _BodyHasher(scope, headers)
        self.chunks: list[bytes] = []
        self.size, self.threshold = 0, threshold
        self.complete = self.disconnected = False

    async def read(self, receive: Receive) -> None:
        """Read until the end, a disconnect, or past ``threshold``."""
        while not (self.complete or self.disconnected) and self.size <= self.threshold:
            message = await receive()
            if message["type"] != "http.request":
                self.disconnected = True
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            self.hasher.update(chunk, more)
            self.size += len(chunk)
            self.chunks.append(chunk)
            self.complete = not more

    def replay(self, receive: Receive, at_end: Callable[[], Awaitable[None]] | None = None) -> Receive:
        """A ``receive`` that gives the chunks read so far, then whatever is still unread."""
        pending = list(self.chunks)
        self.chunks.clear()

        async def replaying() -> Message:
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending) or not self.complete}
            message = await receive()
            if message["type"] == "http.request" and not self.complete:
                more = message.get("more_body", False)
                self.hasher.update(message.get("body", b""), more)
                self.complete = not more
                if self.complete and at_end is not None:
                    await at_end()
            return message

        return replaying


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, factory: sessionmaker[Session],
                 principals: PrincipalCache):
        self.app, self.settings, self.factory, self.principals = app, settings, factory, principals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Reads pass straight through, and so do inference calls: a completion is not stored (it
        # can be large, and is not a resource); a retry with the same key runs it again.
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] in NOT_REMEMBERED:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = headers.get("idempotency-key")
        if not key:
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
        body = _Body(scope, headers, self.settings.max_body_bytes)
        await body.read(receive)
        if body.disconnected:
            return
        held: list[IdempotencyKey] = []
        if body.complete:
            request_hash = body.hasher.hexdigest()
            reserved, stored = await run_in_threadpool(self._reserve, caller, key, request_hash)
            if not reserved:
                await self._answer_held(scope, receive, send, stored, request_hash)
                return
            held.append(stored)
            await self._first_attempt(scope, body.replay(receive), send, held)
            return

        # A long upload: reserve when its last byte is in (the route acts only after that),
        # so the body is spooled once, by the route, and never held here.
        async def reserve_at_end() -> None:
            request_hash = body.hasher.hexdigest()
            reserved, stored = await run_in_threadpool(self._reserve, caller, key, request_hash)
            if not reserved:
                raise _KeyHeld(stored, request_hash)
            held.append(stored)

        try:
            await self._first_attempt(scope, body.replay(receive, reserve_at_end), send, held)
        except _KeyHeld as exc:
            await self._answer_held(scope, receive, send, exc.stored, exc.request_hash)

    async def _answer_held(self, scope: Scope, receive: Receive, send: Send, stored: IdempotencyKey,
                           request_hash: str) -> None:
        if stored.request_hash != request_hash:
            await self._reject(scope, receive, send, "idempotency_key_reused",
                               "this Idempotency-Key was used with a different request body")
        elif stored.status_code == IN_FLIGHT:
            await self._in_flight(scope, receive, send)
        else:
            await Response(stored.body, status_code=stored.status_code, media_type=stored.content_type,
                           headers={"Idempotent-Replayed": "true"})(scope, receive, send)

    async def _first_attempt(self, scope: Scope, receive: Receive, send: Send,
                             held: list[IdempotencyKey]) -> None:
        """Run the handler; ``held`` has our reservation once it is made (for a long upload, only
        when its body is in: a response before that, e.g. a 413, remembers nothing)."""
        status, content_type, body, keep, settled = 0, None, bytearray(), False, False

        async def settle(store: bool) -> None:
            nonlocal settled
            settled = True
            if not held:
                return
            with anyio.CancelScope(shield=True):  # a reservation must not outlive its request
                if store:
                    await run_in_threadpool(self._store, held[0], status, content_type, bytes(body))
                else:
                    await run_in_threadpool(self._release, held[0])

        async def capturing_send(message: Message) -> None:
            nonlocal status, content_type, keep
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = Headers(raw=message.get("headers", [])).get("content-type")
                streaming = (content_type or "").startswith(("text/event-stream", "application/octet-stream"))
                # A new API key's secret is shown once and never stored, not even for replays.
                keep = (not streaming and status < 500 and status not in _NOT_STORED
                        and not scope["path"].endswith("/api_keys"))
                if not keep:
                    await settle(store=False)
            elif message["type"] == "http.response.body" and keep:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    await settle(store=True)
            await send(message)

        try:
            await self.app(scope, receive, capturing_send)
        finally:
            if not settled:  # the handler raised, or never answered in full
                await settle(store=False)

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

    def _reserve(self, caller: str, key: str, request_hash: str) -> tuple[bool, IdempotencyKey]:
        """(True, our reservation) when this attempt now holds the key, else (False, the holder)."""
        with self.factory() as session:
            for _ in range(3):
                mine = IdempotencyKey(scope=caller, key=key, request_hash=request_hash,
                                      status_code=IN_FLIGHT, content_type=None, body="", created_at=now())
                session.add(mine)
                try:
                    session.commit()
                    return True, mine
                except IntegrityError:  # held: by a finished attempt or one in flight
                    session.rollback()
                row = session.get(IdempotencyKey, (caller, key))
                if row is None:  # released meanwhile: try again
                    continue
                expired = row.created_at <= now() - self.settings.idempotency_ttl_s
                abandoned = row.status_code == IN_FLIGHT and row.created_at <= now() - IN_FLIGHT_TIMEOUT_S
                if not (expired or abandoned):
                    return False, row
                # Expired (not yet purged), or abandoned by a crashed attempt. Only the one whose
                # delete matches takes over.
                session.execute(delete(IdempotencyKey).where(
                    IdempotencyKey.scope == caller, IdempotencyKey.key == key,
                    IdempotencyKey.status_code == row.status_code, IdempotencyKey.created_at == row.created_at))
                session.commit()
                session.expunge_all()
        return False, IdempotencyKey(scope=caller, key=key, request_hash=request_hash, status_code=IN_FLIGHT)

    @staticmethod
    def _ours(held: IdempotencyKey):
        """Our reservation only: after a takeover, the row belongs to another attempt."""
        return (IdempotencyKey.scope == held.scope, IdempotencyKey.key == held.key,
                IdempotencyKey.status_code == IN_FLIGHT, IdempotencyKey.created_at == held.created_at)

    def _store(self, held: IdempotencyKey, status: int, content_type: str | None, body: bytes) -> None:
        with self.factory() as session:
            session.execute(update(IdempotencyKey).where(*self._ours(held)).values(
                status_code=status, content_type=content_type, body=body.decode("utf-8", errors="replace")))
            session.commit()

    def _release(self, held: IdempotencyKey) -> None:
        with self.factory() as session:
            session.execute(delete(IdempotencyKey).where(*self._ours(held)))
            session.commit()

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, code: str, detail: str) -> None:
        body = problem_body(422, code=code, detail=detail, param="Idempotency-Key",
                            request_id=scope.get("state", {}).get("request_id"))
        await problem_response(422, body)(scope, receive, send)

    @staticmethod
    async def _in_flight(scope: Scope, receive: Receive, send: Send) -> None:
        body = problem_body(409, code="idempotency_key_in_flight", param="Idempotency-Key",
                            detail="a request with this Idempotency-Key is still being processed; retry shortly",
                            request_id=scope.get("state", {}).get("request_id"))
        await problem_response(409, body, headers={"Retry-After": "1"})(scope, receive, send)


def purge_expired(factory: sessionmaker[Session], *, ttl_s: int, batch: int = PURGE_BATCH,
                  max_batches: int = 100) -> int:
    """Delete records older than ``ttl_s``, ``batch`` rows per transaction (short locks, small
    WAL bursts), at most ``max_batches`` per call; the number deleted."""
    cutoff, deleted = now() - ttl_s, 0
    pk = tuple_(IdempotencyKey.scope, IdempotencyKey.key)
    for _ in range(max_batches):
        with factory() as session:
            oldest = select(IdempotencyKey.scope, IdempotencyKey.key).where(
                IdempotencyKey.created_at < cutoff).limit(batch)
            count = session.execute(delete(IdempotencyKey).where(pk.in_(oldest))).rowcount or 0
            session.commit()
        deleted += count
        if count < batch:
            break
    return deleted


async def purge_periodically(factory: sessionmaker[Session], settings: Settings) -> None:
    """The app's background purge: every ``idempotency_purge_interval_s``, until cancelled."""
    while True:
        try:
            deleted = await run_in_threadpool(purge_expired, factory, ttl_s=settings.idempotency_ttl_s)
            if deleted:
                log.info("purged %d expired idempotency records", deleted)
        except Exception:  # a database outage: try again next round, never take the app down
            log.warning("idempotency purge failed; retrying in %gs", settings.idempotency_purge_interval_s,
                        exc_info=True)
        await anyio.sleep(settings.idempotency_purge_interval_s)
