"""Who is calling: tenant keys (looked up by hash, cached briefly), admin token, job tokens.

The key → tenant lookup is on every tenant request, so it is cached for a few seconds by key
hash in a bounded LRU (a flood of random keys evicts the oldest entries, never the whole cache);
revoking a key or changing a tenant drops the affected entries at once in this process (other
replicas see the change within ``ttl_s``). API keys are only ever held as their sha256.

Keys carry a tag only we can make (service.security.api_key_tag): a key whose tag checks is
always looked up, whatever its client address has spent, so a flood of junk from one address
(or from everyone behind one proxy address) never locks a tenant out; a key of no shape we ever
issued is refused without a database query. Keys issued before tags, and keys whose tag does not
check (tagged under an earlier internal secret: rotating it must not lock every tenant out), are
looked up while their address has failures left (``FailedAuthLimiter``): past that budget such
an uncached key is refused with 429 before any query, so junk in our shapes costs at most
``failed_auth_per_minute`` lookups per address and minute. Every failure counts against the
address, so its 429 tells a client it is guessing.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.errors import Forbidden, RateLimited, Unauthorized
from service.security import api_key_tag_checks
from service.settings import Settings
from service.tenants.repository import find_active_key, hash_key


@dataclass(frozen=True)
class TenantPrincipal:
    tenant_id: str
    key_id: str
    status: str
    requests_per_minute: int


class PrincipalCache:
    def __init__(self, factory: sessionmaker[Session], ttl_s: float = 5.0, max_entries: int = 100_000):
        self._factory = factory
        # TTLCache evicts expired entries first, then the least recently used: bounded memory
        # under a flood of random keys, and the keys in real use stay cached.
        self._entries: TTLCache[str, TenantPrincipal | None] = TTLCache(
            maxsize=max_entries, ttl=ttl_s, timer=time.monotonic)
        self._lock = threading.Lock()

    def cached(self, key_hash: str) -> tuple[bool, TenantPrincipal | None]:
        """(hit, principal); a cached miss (an unknown key) is a hit with None."""
        with self._lock:  # cachetools caches are not thread-safe (LRU order changes on reads)
            try:
                return True, self._entries[key_hash]
            except KeyError:
                return False, None

    def load(self, key_hash: str) -> TenantPrincipal | None:
        with self._factory() as session:
            key = find_active_key(session, key_hash=key_hash)
            principal = None if key is None else TenantPrincipal(
                key.tenant_id, key.id, key.tenant.status, key.tenant.requests_per_minute)
        with self._lock:
            self._entries[key_hash] = principal
        return principal

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def forget(self, *, tenant_id: str | None = None, key_id: str | None = None) -> None:
        with self._lock:
            stale = [h for h, p in self._entries.items()
                     if p is not None and (p.tenant_id == tenant_id or p.key_id == key_id)]
            for h in stale:
                self._entries.pop(h, None)


def check_principal(principal: TenantPrincipal | None) -> TenantPrincipal:
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    if principal.status != "active":
        raise Forbidden("this tenant is disabled")
    return principal


class TokenBuckets:
    """Token buckets by name (tenant, client address): ``per_minute`` capacity, refilled
    continuously. At most ``max_names`` buckets are kept (least recently used dropped: a
    dropped bucket comes back full, which errs on the side of the caller)."""

    def __init__(self, max_names: int = 100_000) -> None:
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(maxsize=max_names)
        self._lock = threading.Lock()

    def _refilled(self, name: str, per_minute: int, now: float) -> float:
        tokens, last = self._buckets.get(name, (float(per_minute), now))
        return min(float(per_minute), tokens + (now - last) * per_minute / 60.0)

    def retry_after(self, name: str, per_minute: int) -> int | None:
        """Seconds until one token is back, or None when one is there now (nothing is taken)."""
        with self._lock:
            tokens = self._refilled(name, per_minute, time.monotonic())
        return None if tokens >= 1.0 else max(1, math.ceil((1.0 - tokens) * 60.0 / per_minute))

    def take(self, name: str, per_minute: int) -> int | None:
        """Take a token: None when taken, else the Retry-After in seconds."""
        with self._lock:
            now = time.monotonic()
            tokens = self._refilled(name, per_minute, now)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                return max(1, math.ceil((1.0 - tokens) * 60.0 / per_minute))
            self._buckets[name] = (tokens - 1.0, now)
            return None


class RateLimiter:
    """A token bucket per tenant: ``requests_per_minute`` capacity, refilled continuously.

    In-process: with N API replicas a tenant gets up to N times its rate (documented trade-off;
    a shared limiter would put a round trip on every request).
    """

    def __init__(self) -> None:
        self._buckets = TokenBuckets()

    def take(self, tenant_id: str, per_minute: int) -> None:
        retry_after = self._buckets.take(tenant_id, per_minute)
        if retry_after is not None:
            raise RateLimited(f"rate limit of {per_minute} requests per minute exceeded",
                              retry_after=retry_after)


class FailedAuthLimiter:
    """Failed authentications per client address (tenant keys and the admin token alike)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets = TokenBuckets()

    def check(self, address: str) -> None:
        """429 when this address has no failure left (taken nothing: a success is free)."""
        retry_after = self._buckets.retry_after(address, self.per_minute)
        if retry_after is not None:
            raise RateLimited("too many failed authentication attempts from this address",
                              retry_after=retry_after, code="too_many_auth_failures")

    def failed(self, address: str) -> None:
        self._buckets.take(address, self.per_minute)


def client_address(scope: dict) -> str:
    # Behind a proxy, uvicorn's --proxy-headers/--forwarded-allow-ips put the real one here.
    client = scope.get("client")
    return client[0] if client else "unknown"


# The shapes of the keys we issue: "lf-" + secrets.token_urlsafe(32), then ".<tag>" since tags.
_KEY_SHAPE = re.compile(r"lf-[A-Za-z0-9_-]{43}(\.[0-9a-f]{16})?")


async def authenticate_tenant(principals: PrincipalCache, limiter: FailedAuthLimiter,
                              token: str | None, address: str, settings: Settings) -> TenantPrincipal:
    """The tenant behind ``token``. A missing key, a forged one, or one in the cache (known good
    or known bad) costs nothing; an uncached key with our tag costs one database lookup, always;
    an uncached key without a tag that checks costs one while ``address`` has failures left."""
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer lf-…'")
    tagged = api_key_tag_checks(token, settings) is True
    if not _KEY_SHAPE.fullmatch(token):
        limiter.check(address)  # a guessing address hears 429, as on the lookup path
        limiter.failed(address)
        raise Unauthorized("invalid or revoked API key")
    key_hash = hash_key(token)
    hit, principal = principals.cached(key_hash)
    if not hit:
        if not tagged:
            limiter.check(address)
        principal = await run_in_threadpool(principals.load, key_hash)
        if principal is None:
            limiter.failed(address)
    return check_principal(principal)
