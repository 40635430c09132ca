"""Data access for tenants and their API keys. Keyword-only; callers own the transaction."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant
from service.db.pages import Page, fetch_page
from service.errors import NotFound
from service.ids import new_id, now
from service.security import api_key_tag
from service.settings import Settings

KEY_PREFIX = "lf-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(session: Session, *, name: str, max_concurrent_jobs: int, max_queued_jobs: int,
                  requests_per_minute: int, limits: dict[str, Any] | None = None) -> Tenant:
    """``limits``: compute limits by column name (max_gpus_per_job, max_concurrent_gpus, ...)."""
    tenant = Tenant(id=new_id("tn_"), name=name, status="active",
                    max_concurrent_jobs=max_concurrent_jobs, max_queued_jobs=max_queued_jobs,
                    requests_per_minute=requests_per_minute, created_at=now(), **(limits or {}))
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, *, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}", param="tenant_id")
    return tenant


def list_tenants(session: Session, *, after: str | None = None, limit: int = 20) -> Page[Tenant]:
    return fetch_page(session, select(Tenant), Tenant.id, after=after, limit=limit)


def create_api_key(session: Session, *, tenant_id: str, name: str | None,
                   settings: Settings) -> tuple[ApiKey, str]:
    """A new key and its secret; only the hash is stored, so the secret is returned this once.
    The secret is ``lf-<random>.<tag>`` (service.security.api_key_tag: a forged key is refused
    without a lookup)."""
    body = KEY_PREFIX + secrets.token_urlsafe(32)
    secret = f"{body}.{api_key_tag(body, settings)}"
    key = ApiKey(id=new_id("key_"), tenant_id=tenant_id, name=name, key_hash=hash_key(secret),
                 prefix=secret[:10], created_at=now(), revoked_at=None)
    session.add(key)
    session.flush()
    return key, secret


def list_api_keys(session: Session, *, tenant_id: str, after: str | None = None,
                  limit: int = 20) -> Page[ApiKey]:
    get_tenant(session, tenant_id=tenant_id)  # an unknown tenant is a 404, not an empty page
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
    return fetch_page(session, query, ApiKey.id, after=after, limit=limit)


def revoke_api_key(session: Session, *, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = now()
    return key


def find_active_key(session: Session, *, key_hash: str) -> ApiKey | None:
    """The unrevoked key with this hash, its tenant loaded in the same query."""
    return session.scalars(
        select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).one_or_none()
