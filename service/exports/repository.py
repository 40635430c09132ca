"""Data access for exports and blends. Keyword-only; callers own the transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Operation, OperationEventRow
from service.db.pages import Page, fetch_page, parse_int_cursor
from service.errors import NotFound
from service.exports import states
from service.ids import new_id, now

ID_PREFIX = {"export": "export-", "blend": "blend-"}
EVENT_ID_PREFIX = "opevent-"
NOT_FOUND_CODE = {"export": "export_not_found", "blend": "blend_not_found"}


def create_operation(session: Session, *, tenant_id: str, kind: str, base_model_id: str, method: str,
                     request: dict[str, Any], key_prefix_of, adapter_id: str | None = None,
                     result_adapter_id_of=None) -> Operation:
    """A queued export or blend; ``key_prefix_of(id)`` (and ``result_adapter_id_of(id)``) name
    its output from its id."""
    op_id = new_id(ID_PREFIX[kind])
    ts = now()
    op = Operation(id=op_id, tenant_id=tenant_id, kind=kind, status=states.QUEUED, adapter_id=adapter_id,
                   base_model_id=base_model_id, method=method, request=request,
                   result_adapter_id=result_adapter_id_of(op_id) if result_adapter_id_of else None,
                   key_prefix=key_prefix_of(op_id), attempts=0, created_at=ts, updated_at=ts)
    session.add(op)
    session.add(OperationEventRow(operation_id=op_id, created_at=ts, level="info", type="status",
                                  message=f"{kind.capitalize()} queued", data={"to": states.QUEUED}))
    session.flush()
    return op


def get_for_tenant(session: Session, *, tenant_id: str, kind: str, operation_id: str,
                   for_update: bool = False) -> Operation:
    """The tenant's export or blend; another tenant's answers NotFound like a missing one."""
    query = select(Operation).where(Operation.id == operation_id, Operation.tenant_id == tenant_id,
                                    Operation.kind == kind)
    op = session.scalars(query.with_for_update() if for_update else query).one_or_none()
    if op is None:
        raise NotFound(f"no {kind} {operation_id!r}", code=NOT_FOUND_CODE[kind], param=f"{kind}_id")
    return op


def list_for_tenant(session: Session, *, tenant_id: str, kind: str, adapter_id: str | None = None,
                    after: str | None = None, limit: int = 20) -> Page[Operation]:
    query = select(Operation).where(Operation.tenant_id == tenant_id, Operation.kind == kind)
    if adapter_id is not None:
        query = query.where(Operation.adapter_id == adapter_id)
    return fetch_page(session, query, Operation.id, after=after, limit=limit)


def add_events(session: Session, *, operation_id: str, events: list[dict[str, Any]]) -> None:
    ts = now()
    session.add_all(OperationEventRow(operation_id=operation_id, created_at=ts, level=e.get("level", "info"),
                                      type=e.get("type", "message"), message=e["message"], data=e.get("data"))
                    for e in events)


def list_events_for_tenant(session: Session, *, tenant_id: str, kind: str, operation_id: str,
                           after: str | None = None, limit: int = 20,
                           oldest_first: bool = False) -> Page[OperationEventRow]:
    get_for_tenant(session, tenant_id=tenant_id, kind=kind, operation_id=operation_id)
    query = select(OperationEventRow).where(OperationEventRow.operation_id == operation_id)
    return fetch_page(session, query, OperationEventRow.id,
                      after=parse_int_cursor(after, prefix=EVENT_ID_PREFIX), limit=limit,
                      newest_first=not oldest_first)
