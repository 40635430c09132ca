"""Data access for uploaded files. Keyword-only; callers own the transaction."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import File
from service.db.pages import Page, fetch_page
from service.errors import NotFound

FILE_ID_PREFIX = "file-"


def object_key_for(*, tenant_id: str, file_id: str) -> str:
    return f"tenants/{tenant_id}/files/{file_id}.jsonl"


def get_file_for_tenant(session: Session, *, tenant_id: str, file_id: str,
                        param: str = "file_id") -> File:
    """The tenant's file; another tenant's file is NotFound exactly like a missing one."""
    file = session.scalars(select(File).where(File.id == file_id, File.tenant_id == tenant_id)).one_or_none()
    if file is None:
        raise NotFound(f"no file {file_id!r}", param=param)
    return file


def list_files(session: Session, *, tenant_id: str, purpose: str | None = None,
               after: str | None = None, limit: int = 20) -> Page[File]:
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return fetch_page(session, query, File.id, after=after, limit=limit)
