"""The state machine of exports and blends: queued → running → succeeded | failed.

Declared here and only here, and moved by ``transition`` (a compare-and-set on the status, so
a racing writer loses with InvalidTransition instead of overwriting), as jobs are.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.errors import InvalidTransition
from service.ids import now

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
TERMINAL = frozenset({SUCCEEDED, FAILED})
ALLOWED: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, FAILED}),
    # running → queued: the run was lost (Ray restarted, the driver died) and is retried.
    RUNNING: frozenset({SUCCEEDED, FAILED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
}


def transition(session: Session, op: Any, to_status: str, *, message: str | None = None, **fields: Any) -> None:
    """Move ``op`` (a service.db.models.Operation) to ``to_status`` with ``fields``, writing a
    status event. Does not commit. Raises InvalidTransition for an undeclared move or a row
    whose status changed underneath us."""
    from service.db.models import Operation, OperationEventRow

    from_status = op.status
    if to_status not in ALLOWED[from_status]:
        raise InvalidTransition(op.id, from_status, to_status)
    ts = now()
    values: dict[str, Any] = {"status": to_status, "updated_at": ts, **fields}
    if to_status == RUNNING:
        values.setdefault("started_at", ts)
    if to_status in TERMINAL:
        values.setdefault("finished_at", ts)
    names = list(values)
    row = session.execute(
        update(Operation).where(Operation.id == op.id, Operation.status == from_status).values(**values)
        .returning(*(getattr(Operation, n) for n in names)).execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        session.refresh(op)
        raise InvalidTransition(op.id, op.status, to_status)
    for name, value in zip(names, row, strict=True):
        set_committed_value(op, name, value)
    data: dict[str, Any] = {"from": from_status, "to": to_status}
    if fields.get("error_code"):
        data["error"] = {"code": fields["error_code"], "message": fields.get("error_message")}
    session.execute(insert(OperationEventRow), [{
        "operation_id": op.id, "created_at": ts, "level": "error" if to_status == FAILED else "info",
        "type": "status", "message": message or f"{op.kind.capitalize()} status: {to_status}", "data": data}])
