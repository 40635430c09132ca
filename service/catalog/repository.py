"""Data access for base models and published adapters. Keyword-only; callers own the transaction."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Adapter, BaseModelRow
from service.db.pages import Page, fetch_page
from service.errors import Conflict, NotFound
from service.ids import now
from workers.spec import METHODS

DEFAULT_BASE_MODEL = {
    "id": "lorafleet/tiny-llama",
    "source_uri": "builtin://lorafleet/tiny-llama",
    "architecture": "llama",
    "methods": list(METHODS),
    "max_rank": 64,
    "quantization": "nf4",  # served as one shared 4-bit NF4 base
}


def create_base_model(session: Session, *, id: str, source_uri: str, architecture: str | None,
                      methods: list[str], max_rank: int, quantization: str | None) -> BaseModelRow:
    if session.get(BaseModelRow, id) is not None:
        raise Conflict(f"base model {id!r} is already registered", param="id")
    row = BaseModelRow(id=id, source_uri=source_uri, architecture=architecture, methods=methods,
                       max_rank=max_rank, quantization=quantization, created_at=now())
    session.add(row)
    session.flush()
    return row


def ensure_base_model(session: Session, **fields) -> BaseModelRow:
    """Register a base model unless it already is (start-up registration of the default). One
    registered by an older release gains the methods this one adds; none is taken away."""
    existing = session.get(BaseModelRow, fields["id"])
    if existing is None:
        return create_base_model(session, **fields)
    if missing := [m for m in fields["methods"] if m not in existing.methods]:
        existing.methods = [*existing.methods, *missing]
    return existing


def get_base_model(session: Session, *, model_id: str, param: str = "model") -> BaseModelRow:
    row = session.get(BaseModelRow, model_id)
    if row is None:
        raise NotFound(f"no base model {model_id!r}", code="model_not_found", param=param)
    return row


def list_base_models(session: Session) -> list[BaseModelRow]:
    return list(session.scalars(select(BaseModelRow).order_by(BaseModelRow.id)))


def get_adapter_for_tenant(session: Session, *, tenant_id: str, adapter_id: str,
                           param: str = "model") -> Adapter:
    """The tenant's adapter; another tenant's is NotFound (``model_not_found``) like a missing one."""
    adapter = session.scalars(select(Adapter).where(
        Adapter.id == adapter_id, Adapter.tenant_id == tenant_id)).one_or_none()
    if adapter is None:
        raise NotFound(f"no model {adapter_id!r}", code="model_not_found", param=param)
    return adapter


def list_adapters(session: Session, *, tenant_id: str, after: str | None = None,
                  limit: int = 100) -> Page[Adapter]:
    query = select(Adapter).where(Adapter.tenant_id == tenant_id)
    return fetch_page(session, query, Adapter.id, after=after, limit=limit)
