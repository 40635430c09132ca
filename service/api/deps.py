"""Dependencies every route declares through ``Annotated`` aliases.

Tenant scoping lives here: ``CurrentTenant`` authenticates the key, refuses a disabled tenant
and applies the tenant's rate limit, and handlers only ever query with its ``tenant_id``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import TenantPrincipal, authenticate_tenant, check_principal, client_address
from service.db.models import Job
from service.errors import Conflict, Forbidden, Unauthorized
from service.jobs import states
from service.security import is_admin_token, job_token_claims
from service.settings import Settings
from workers.storage import ObjectStore

_tenant_key = HTTPBearer(auto_error=False, scheme_name="TenantKey",
                         description="A tenant API key (lf-…)")
_admin_token = HTTPBearer(auto_error=False, scheme_name="AdminToken",
                          description="LORAFLEET_ADMIN_TOKEN")
_job_token = HTTPBearer(auto_error=False, scheme_name="JobToken",
                        description="The job-scoped worker token")

Credentials = HTTPAuthorizationCredentials | None
T = TypeVar("T")


# The plain getters are ``async`` on purpose: FastAPI runs a sync dependency in its thread
# pool, a thread hop per request for an attribute read.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


class ReadDatabase:
    """Reads for ``async`` handlers: ``await db.run(repository_fn, **kwargs)``.

    Each call borrows an autocommit session in a worker thread and gives its connection back
    before the handler goes on. (A sync handler holding a session until dependency teardown
    can deadlock FastAPI's thread pool against the connection pool under load: the response
    of a sync handler is serialised in the same pool.) Reads get their own small limiter:
    a few threads keep the database busy, while dozens only fight over the GIL and stretch
    the latency tail.
    """

    def __init__(self, factory: sessionmaker[Session], *, max_threads: int):
        self._factory = factory
        # The factory's (autocommit) engine, for Core reads that need no Session.
        self._engine: Engine = factory.kw["bind"]
        self._limiter = anyio.CapacityLimiter(max_threads)

    async def run(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(self._call, fn, kwargs, limiter=self._limiter)

    async def rows(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """Like ``run``, but ``fn`` gets a bare autocommit Connection: for Core selects on the
        hot read routes, without a Session's set-up and teardown."""
        return await anyio.to_thread.run_sync(self._call_on_connection, fn, kwargs, limiter=self._limiter)

    def _call(self, fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
        with self._factory() as session:
            return fn(session, **kwargs)

    def _call_on_connection(self, fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
        with self._engine.connect() as conn:
            return fn(conn, **kwargs)


async def get_read_db(request: Request) -> ReadDatabase:
    return request.app.state.read_db


async def get_session(request: Request) -> AsyncIterator[Session]:
    # A Session connects lazily, so creating it here costs nothing; handlers commit explicitly.
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


async def current_tenant(request: Request,
                         creds: Annotated[Credentials, Depends(_tenant_key)]) -> TenantPrincipal:
    # The AuthGate middleware authenticated the key before the body was read; without it (an
    # app built otherwise) the same check runs here.
    principal = request.scope.get("state", {}).get("principal")
    if principal is None:
        principal = await authenticate_tenant(request.app.state.principals, request.app.state.auth_failures,
                                              creds.credentials if creds else None, client_address(request.scope),
                                              request.app.state.settings)
    principal = check_principal(principal)
    request.app.state.rate_limiter.take(principal.tenant_id, principal.requests_per_minute)
    return principal


async def require_admin(request: Request, creds: Annotated[Credentials, Depends(_admin_token)]) -> None:
    if creds is None:
        raise Unauthorized("missing admin token")
    if not is_admin_token(creds.credentials, request.app.state.settings):
        raise Forbidden("not an admin token")


def _run_of(session: Session, job_id: str):
    return session.execute(select(Job.status, Job.attempts).where(Job.id == job_id)).one_or_none()


@dataclass(frozen=True)
class WorkerRun:
    """The run (attempt) of a job a worker's token speaks for."""

    job_id: str
    attempt: int


def check_run(job_id: str, claimed_attempt: int, run: Any, *, active: bool) -> None:
    """409 ``run_over`` unless ``run`` (a job's status and attempts) is still the claimed run,
    and with ``active``, still running."""
    if run is None or run.attempts != claimed_attempt:
        raise Conflict("this run of the job is over: a newer run replaced it", code="run_over")
    if active and run.status not in states.ACTIVE:
        raise Conflict(f"this run of the job is over: the job is {run.status}", code="run_over")


def lock_current_run(session: Session, run: WorkerRun) -> Job:
    """The job, its row locked until the session commits, if ``run`` is still its current,
    active run. The dependency's check was a separate read: a requeue, a newer run or a cancel
    may have landed since, so every write re-checks here, under the lock those take too."""
    job = session.scalars(select(Job).where(Job.id == run.job_id).with_for_update()).one_or_none()
    check_run(run.job_id, run.attempt, job, active=True)
    return job


async def _current_run(request: Request, job_id: str, creds: Credentials, *, active: bool) -> WorkerRun:
    """Checks a worker's token: signed for this job, unexpired, and of the job's current run
    (attempt); with ``active``, also that the job still runs. A run that is over (requeued,
    replaced by a newer run, or its job ended) may no longer report anything. A cheap early
    refusal: the write routes re-check under a row lock (``lock_current_run``)."""
    claims = job_token_claims(creds.credentials, request.app.state.settings) if creds else None
    if claims is None or claims.job_id != job_id:
        raise Unauthorized("missing, invalid or expired job token")
    check_run(job_id, claims.attempt, await request.app.state.read_db.run(_run_of, job_id=job_id),
              active=active)
    return WorkerRun(job_id, claims.attempt)


async def job_from_token(request: Request, job_id: Annotated[str, Path(max_length=64)],
                         creds: Annotated[Credentials, Depends(_job_token)]) -> WorkerRun:
    """The run an internal route reports on: the job's current run, still active (writes
    re-check it with ``lock_current_run``)."""
    return await _current_run(request, job_id, creds, active=True)


async def job_from_token_any_status(request: Request, job_id: Annotated[str, Path(max_length=64)],
                                    creds: Annotated[Credentials, Depends(_job_token)]) -> str:
    """For the status poll: the current run may read its job's status after the job ended
    (that is how a worker learns it was cancelled)."""
    return (await _current_run(request, job_id, creds, active=False)).job_id


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadDB = Annotated[ReadDatabase, Depends(get_read_db)]
CurrentTenant = Annotated[TenantPrincipal, Depends(current_tenant)]
AdminDep = Depends(require_admin)
WorkerRunFromToken = Annotated[WorkerRun, Depends(job_from_token)]
JobIdForStatusPoll = Annotated[str, Depends(job_from_token_any_status)]
