"""Requests from the control plane to the serving app, signed (HMAC-SHA256) and short-lived.

Torch- and service-free (the service imports it, like ``workers.spec``). The control plane signs
every request it sends to serving; the serving app verifies before it reads anything the caller
chose, so a pod that can reach serving but holds no key gets nothing but a 401.

What is signed: the method, the path (with its query string), the tenant, a request id, an
expiry, and the SHA-256 of the exact body bytes, which carry the ``lorafleet`` routing field
(tenant prefix, adapter id). Signing the whole body rather than only the routing field costs one
hash and means the signature is checked before the JSON is even parsed, and no part of a signed
request (its messages included) can be changed.

Keys rotate without downtime: each signature names its key by an id derived from the key, and the
verifier accepts the current and the previous key. A signature lives ``ttl_s`` (30 s); within
that time the verifier refuses a request id it has already seen (per verifying process).

Clocks: API and serving pods run on different nodes, whose clocks drift. The verifier allows
``skew_s`` (30 s) either way: a signature is accepted until ``skew_s`` after its expiry, and may
claim to live up to ``max_ttl_s + skew_s`` from the verifier's now. A replay stays refused for as
long as the signature is accepted (``_remember`` keeps ids until expiry + skew).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SIGNATURE = "x-lorafleet-signature"
KEY_ID = "x-lorafleet-key-id"
EXPIRES = "x-lorafleet-expires"
REQUEST_ID = "x-lorafleet-request-id"
TENANT = "x-lorafleet-tenant"

KEY_ENV, PREVIOUS_KEY_ENV = "LORAFLEET_SERVE_SIGNING_KEY", "LORAFLEET_SERVE_SIGNING_KEY_PREVIOUS"
DEFAULT_TTL_S = 30
DEFAULT_SKEW_S = 30
# Ids and tenants go into headers and logs: a narrow alphabet, bounded length.
_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{0,128}")
_HEX_MAC = re.compile(r"[0-9a-f]{64}")  # what ``_mac`` writes: SHA-256, lowercase hex


def key_id(key: str) -> str:
    """A public name for a key (not a hash of the key itself: nothing about it leaks)."""
    return hmac.new(key.encode(), b"lorafleet-serve-key-id", hashlib.sha256).hexdigest()[:16]


def _message(method: str, path: str, tenant: str, request_id: str, expires: int, body: bytes) -> bytes:
    return "\n".join(("lorafleet-serve-v1", method.upper(), path, tenant, request_id, str(expires),
                      hashlib.sha256(body).hexdigest())).encode()


def _mac(key: str, message: bytes) -> str:
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


class Signer:
    """The control plane's side: headers for one request."""

    def __init__(self, key: str, *, ttl_s: int = DEFAULT_TTL_S, clock: Callable[[], float] = time.time):
        if not key:
            raise ValueError("an empty signing key")
        self._key, self._kid, self.ttl_s, self._clock = key, key_id(key), ttl_s, clock

    def headers(self, method: str, path: str, body: bytes = b"", *, tenant: str = "",
                request_id: str) -> dict[str, str]:
        """``path`` exactly as the server will see it (decoded, with ``?query`` if any)."""
        if not _TOKEN.fullmatch(tenant) or not request_id or not _TOKEN.fullmatch(request_id):
            raise ValueError("tenant and request id must be short [A-Za-z0-9_.:-] strings")
        expires = int(self._clock()) + self.ttl_s
        mac = _mac(self._key, _message(method, path, tenant, request_id, expires, body))
        return {SIGNATURE: mac, KEY_ID: self._kid, EXPIRES: str(expires), REQUEST_ID: request_id,
                TENANT: tenant}


class SignatureError(Exception):
    """Any refusal. ``reason`` is for logs and tests; callers answer one 401 for all of them."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    """What the headers claim; trusted only once ``Verifier.verify`` returned it."""

    signature: str
    key_id: str
    expires: int
    request_id: str
    tenant: str


class Verifier:
    """The serving side. One per process: the replay set lives in memory.

    ``check_headers`` is cheap and runs before the body is read; ``verify`` needs the body bytes.
    """

    def __init__(self, keys: list[str], *, max_ttl_s: int = DEFAULT_TTL_S, skew_s: int = DEFAULT_SKEW_S,
                 max_seen: int = 100_000, clock: Callable[[], float] = time.time):
        self._keys = {key_id(k): k for k in keys if k}
        self.max_ttl_s, self.skew_s, self.max_seen, self._clock = max_ttl_s, skew_s, max_seen, clock
        # request id → expiry, in arrival order (≈ expiry order: every signature lives ttl_s).
        self._seen: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **kw) -> Verifier:
        return cls([env.get(KEY_ENV, ""), env.get(PREVIOUS_KEY_ENV, "")], **kw)

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def check_headers(self, headers: Mapping[str, str]) -> Claims:
        if not self._keys:
            raise SignatureError("no_key", "serving has no signing key configured")
        values = [headers.get(h) for h in (SIGNATURE, KEY_ID, EXPIRES, REQUEST_ID)]
        if not all(values):
            raise SignatureError("missing", "the request is not signed by the control plane")
        signature, kid, expires, request_id = values
        tenant = headers.get(TENANT) or ""
        if kid not in self._keys:
            raise SignatureError("unknown_key", "the request is signed with an unknown key")
        # Header values arrive as latin-1 text: anything but our own hex would make
        # ``hmac.compare_digest`` raise (non-ASCII str) instead of refusing.
        if not _HEX_MAC.fullmatch(signature):
            raise SignatureError("malformed", "the signature is not 64 hex digits")
        if not expires.isascii() or not expires.isdigit() or len(expires) > 12:
            raise SignatureError("malformed", "the signature's expiry is not a timestamp")
        if not _TOKEN.fullmatch(request_id) or not _TOKEN.fullmatch(tenant):
            raise SignatureError("malformed", "the signed request id or tenant is malformed")
        now = int(self._clock())
        if int(expires) < now - self.skew_s:
            raise SignatureError("expired", "the signature has expired")
        if int(expires) > now + self.max_ttl_s + self.skew_s:
            raise SignatureError("too_long", "the signature lives longer than allowed")
        return Claims(signature, kid, int(expires), request_id, tenant)

    def verify(self, claims: Claims, method: str, path: str, body: bytes) -> Claims:
        message = _message(method, path, claims.tenant, claims.request_id, claims.expires, body)
        expected = _mac(self._keys[claims.key_id], message).encode()
        if not hmac.compare_digest(expected, claims.signature.encode("utf-8", "surrogateescape")):
            raise SignatureError("mismatch", "the signature does not match the request")
        self._remember(claims)
        return claims

    def _remember(self, claims: Claims) -> None:
        """Only after the MAC matched: nobody without the key can fill the set."""
        now = int(self._clock())
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires + self.skew_s >= now:
                break
            del self._seen[oldest]
        if claims.request_id in self._seen:
            raise SignatureError("replayed", "this signed request was already used")
        if len(self._seen) >= self.max_seen:
            # Full of live signatures: refusing is safe (the control plane retries with a new
            # one after its own request fails); forgetting one would let it be replayed.
            raise SignatureError("busy", "too many signed requests in flight")
        self._seen[claims.request_id] = claims.expires
