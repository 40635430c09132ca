"""Credentials the service checks: the admin token and job-scoped worker tokens.

A job token is HMAC-SHA256(internal_secret, job_id): it proves the caller was handed this job's
spec, is valid for that job only, and needs no table (workers hold no database credentials).
"""

from __future__ import annotations

import hashlib
import hmac

from service.settings import Settings


def job_token(job_id: str, settings: Settings) -> str:
    secret = settings.internal_secret.get_secret_value().encode()
    return hmac.new(secret, job_id.encode(), hashlib.sha256).hexdigest()


def is_valid_job_token(token: str, job_id: str, settings: Settings) -> bool:
    return hmac.compare_digest(token.encode(), job_token(job_id, settings).encode())


def is_admin_token(token: str, settings: Settings) -> bool:
    return hmac.compare_digest(token.encode(), settings.admin_token.get_secret_value().encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
