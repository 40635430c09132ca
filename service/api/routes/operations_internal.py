"""Export / blend runs → control plane: events, the result, a failure.

Authenticated by the run-scoped token (service.security.job_token, signed for the operation's
id and attempt), as fine-tune workers are: a run can only report on its own operation, only
while it is that operation's current run and the operation is running (409 ``run_over``
after). Every write locks the row and re-checks under the lock.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import Credentials, SessionDep, StoreDep, _job_token
from service.api.schemas.common import Strict
from service.db.models import Operation
from service.errors import Conflict, Unauthorized, ValidationFailed
from service.exports import repository as ops
from service.exports import states
from service.exports.results import commit_result
from service.jobs.public_errors import tenant_failure_message
from workers.spec import OPERATION_ERROR_CODES, JobEvent, OperationResult

router = APIRouter(prefix="/internal/v1/operations/{operation_id}", tags=["internal"])


async def _claims(request: Request, operation_id: Annotated[str, Path(max_length=64)],
                  creds: Annotated[Credentials, Depends(_job_token)]) -> tuple[str, int]:
    """(operation id, attempt) the token speaks for; the writes check it is the current run."""
    from service.security import job_token_claims

    claims = job_token_claims(creds.credentials, request.app.state.settings) if creds else None
    if claims is None or claims.job_id != operation_id:
        raise Unauthorized("missing, invalid or expired operation token")
    return operation_id, claims.attempt


RunClaims = Annotated[tuple[str, int], Depends(_claims)]


def _lock_current(session: Session, claims: tuple[str, int]) -> Operation:
    op = session.scalars(select(Operation).where(Operation.id == claims[0]).with_for_update()).one_or_none()
    if op is None or op.attempts != claims[1]:
        raise Conflict("this run is over: a newer run replaced it", code="run_over")
    if op.status != states.RUNNING:
        raise Conflict(f"this run is over: the {op.kind} is {op.status}", code="run_over")
    return op


class EventBatch(Strict):
    events: Annotated[list[JobEvent], Field(min_length=1, max_length=1000)]


class FailureReport(Strict):
    code: str
    message: Annotated[str, Field(max_length=10_000)]

    @field_validator("code")
    @classmethod
    def _known(cls, code: str) -> str:
        if code not in OPERATION_ERROR_CODES:
            raise ValueError(f"unknown error code; use one of {sorted(OPERATION_ERROR_CODES)}")
        return code


@router.post("/events", status_code=204)
def post_events(claims: RunClaims, body: EventBatch, session: SessionDep) -> Response:
    op = _lock_current(session, claims)
    ops.add_events(session, operation_id=op.id, events=[e.model_dump() for e in body.events])
    session.commit()
    return Response(status_code=204)


@router.post("/result", status_code=204)
def post_result(claims: RunClaims, body: OperationResult, session: SessionDep, store: StoreDep) -> Response:
    op = _lock_current(session, claims)
    ok = commit_result(session, store, op, body)
    session.commit()
    if not ok:
        raise ValidationFailed(op.error_message or "output rejected", code="storage_error", param="manifest_key")
    return Response(status_code=204)


@router.post("/failure", status_code=204)
def post_failure(claims: RunClaims, body: FailureReport, session: SessionDep) -> Response:
    op = _lock_current(session, claims)
    # invalid_adapter is the tenant's (PEFT refusing these adapters): its words are about them.
    message = body.message if body.code == "invalid_adapter" else tenant_failure_message(op.id, body.code, body.message)
    states.transition(session, op, states.FAILED, error_code=body.code, error_message=message,
                      message=f"{op.kind.capitalize()} failed: {message}")
    session.commit()
    return Response(status_code=204)
