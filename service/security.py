"""Credentials the service checks: the admin token, job-scoped worker tokens, and the tags
that tenant API keys carry (so a forged key is refused without a database lookup).

A job token is self-contained: ``v2.<job id>.<attempt>.<expires at>.<hmac>``, the HMAC-SHA256
(key: internal_secret) of everything before it. It proves the caller was handed the spec of
that one run (attempt) of that one job, until it expires, and needs no table (workers hold no
database credentials). Whether the attempt is still the job's current, active one is the
internal routes' check (service.api.deps), since only the database knows.

The token rides in the Ray Job's spec, readable by anyone holding the Ray token: the attempt
and the expiry bound what a leaked one is worth to one run of one job.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from service.settings import Settings

_VERSION = "v2"
# Domain separation: the internal secret may sign other things one day.
_CONTEXT = b"lorafleet job token\n"


@dataclass(frozen=True)
class JobTokenClaims:
    job_id: str
    attempt: int
    expires_at: int  # Unix seconds


def _sign(body: str, settings: Settings) -> str:
    secret = settings.internal_secret.get_secret_value().encode()
    return hmac.new(secret, _CONTEXT + body.encode(), hashlib.sha256).hexdigest()


# How long a token outlives its run's wall-clock limit: the scheduler notices a run past its
# limit on its next pass, a result may be retried for 10 minutes (workers.train.report), and the
# scheduler's and the API's clocks may differ a little.
JOB_TOKEN_SLACK_S = 3600


def job_token(job_id: str, attempt: int, settings: Settings, *, ttl_s: int,
              wall_clock_s: int | None = None) -> str:
    """The token of run ``attempt`` of ``job_id``, valid for ``ttl_s`` seconds from now, or for
    the run's wall-clock limit ``wall_clock_s`` plus ``JOB_TOKEN_SLACK_S`` when that is sooner:
    a leaked token is worth nothing once its run has had to end."""
    if attempt < 0 or ttl_s <= 0 or (wall_clock_s is not None and wall_clock_s <= 0):
        raise ValueError("attempt must be >= 0, ttl_s and wall_clock_s > 0")
    if wall_clock_s is not None:
        ttl_s = min(ttl_s, wall_clock_s + JOB_TOKEN_SLACK_S)
    body = f"{_VERSION}.{job_id}.{attempt}.{int(time.time()) + int(ttl_s)}"
    return f"{body}.{_sign(body, settings)}"


def job_token_claims(token: str, settings: Settings) -> JobTokenClaims | None:
    """The token's claims if its signature is ours and it has not expired, else None.

    Tokens of the old format (a bare HMAC of the job id: no attempt, no expiry) are refused.
    """
    body, _, mac = token.rpartition(".")
    parts = body.split(".")
    if len(parts) < 4 or parts[0] != _VERSION:
        return None
    if not hmac.compare_digest(mac.encode(), _sign(body, settings).encode()):
        return None
    job_id, attempt, expires = ".".join(parts[1:-2]), parts[-2], parts[-1]
    if not (attempt.isascii() and attempt.isdigit() and expires.isascii() and expires.isdigit()):
        return None  # cannot happen with our own signature; kept for a misconfigured shared secret
    if int(expires) <= time.time():
        return None
    return JobTokenClaims(job_id=job_id, attempt=int(attempt), expires_at=int(expires))


def is_valid_job_token(token: str, job_id: str, settings: Settings) -> bool:
    """A signed, unexpired token of ``job_id`` (any attempt: the attempt is checked against the
    database where it matters, in service.api.deps)."""
    claims = job_token_claims(token, settings)
    return claims is not None and hmac.compare_digest(claims.job_id.encode(), job_id.encode())


# Tenant API keys carry a tag: ``lf-<body>.<tag>``, the tag a truncated HMAC (internal_secret) of
# the body. Only we can make a key whose tag checks, so such a key is always worth its database
# lookup, whatever a client address has spent on failures. A key whose tag does not check (a
# forgery, or one tagged under an earlier internal secret) is looked up only within its address's
# failed-auth budget (service.api.auth), so rotating the secret locks no tenant out. 64 bits:
# forging one tag costs 2**63 tries on average, to buy one database lookup.
_API_KEY_CONTEXT = b"api-key\n"
API_KEY_TAG_CHARS = 16
_TAG_ALPHABET = frozenset("0123456789abcdef")


def api_key_tag(body: str, settings: Settings) -> str:
    """The tag of an API key whose text before the dot is ``body`` (``lf-`` + random)."""
    secret = settings.internal_secret.get_secret_value().encode()
    return hmac.new(secret, _API_KEY_CONTEXT + body.encode(), hashlib.sha256).hexdigest()[:API_KEY_TAG_CHARS]


def api_key_tag_checks(key: str, settings: Settings) -> bool | None:
    """True: ``key`` is tagged and the tag is ours. False: tagged, but not by us (a forgery or
    junk). None: untagged, a key issued before tags (``lf-`` + 43 URL-safe characters), which
    only the database can tell."""
    body, dot, tag = key.rpartition(".")
    if not dot:
        return None
    if len(tag) != API_KEY_TAG_CHARS or not set(tag) <= _TAG_ALPHABET:
        return False
    return hmac.compare_digest(tag.encode(), api_key_tag(body, settings).encode())


def is_admin_token(token: str, settings: Settings) -> bool:
    return hmac.compare_digest(token.encode(), settings.admin_token.get_secret_value().encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
