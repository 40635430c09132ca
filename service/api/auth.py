"""Who is calling: tenant keys (looked up by hash, cached briefly), admin token, job tokens.

The key → tenant lookup is on every tenant request, so it is cached for a few seconds by key
hash; revoking a key or changing a tenant drops the affected entries at once in this process
(other replicas see the change within ``ttl_s``).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from service.errors import Forbidden, RateLimited, Unauthorized
from service.tenants.repository import find_active_key


@dataclass(frozen=True)
class TenantPrincipal:
    tenant_id: str
    key_id: str
    status: str
    requests_per_minute: int


class PrincipalCache:
    def __init__(self, factory: sessionmaker[Session], ttl_s: float = 5.0):
        self._factory, self._ttl = factory, ttl_s
        self._entries: dict[str, tuple[float, TenantPrincipal | None]] = {}
        self._lock = threading.Lock()

    def cached(self, key_hash: str) -> tuple[bool, TenantPrincipal | None]:
        """(hit, principal); a cached miss (an unknown key) is a hit with None."""
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def load(self, key_hash: str) -> TenantPrincipal | None:
        with self._factory() as session:
            key = find_active_key(session, key_hash=key_hash)
            principal = None if key is None else TenantPrincipal(
                key.tenant_id, key.id, key.tenant.status, key.tenant.requests_per_minute)
        with self._lock:
            if len(self._entries) > 100_000:  # bound memory under a flood of random keys
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self._ttl, principal)
        return principal

    def forget(self, *, tenant_id: str | None = None, key_id: str | None = None) -> None:
        with self._lock:
            stale = [h for h, (_, p) in self._entries.items()
                     if p is not None and (p.tenant_id == tenant_id or p.key_id == key_id)]
            for h in stale:
                del self._entries[h]


def check_principal(principal: TenantPrincipal | None) -> TenantPrincipal:
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    if principal.status != "active":
        raise Forbidden("this tenant is disabled")
    return principal


class RateLimiter:
    """A token bucket per tenant: ``requests_per_minute`` capacity, refilled continuously.

    In-process: with N API replicas a tenant gets up to N times its rate (documented trade-off;
    a shared limiter would put a round trip on every request).
    """

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant → (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, tenant_id: str, per_minute: int) -> None:
        rate = per_minute / 60.0
        with self._lock:
            now = time.monotonic()
            tokens, last = self._buckets.get(tenant_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[tenant_id] = (tokens, now)
                retry_after = max(1, math.ceil((1.0 - tokens) / rate))
                raise RateLimited(f"rate limit of {per_minute} requests per minute exceeded",
                                  retry_after=retry_after)
            self._buckets[tenant_id] = (tokens - 1.0, now)
