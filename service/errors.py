"""Domain errors, raised anywhere inside the service and mapped to problem+json in service.api.errors.

Each carries a stable machine-readable ``code``, a human ``message`` and, where one input is at
fault, the ``param`` that names it.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.param = param
        self.extra = extra or {}


class BadRequest(DomainError):
    code = "bad_request"


class Unauthorized(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, job_id: str, from_status: str, to_status: str):
        super().__init__(f"job {job_id} cannot go from '{from_status}' to '{to_status}'", param="status")
        self.from_status, self.to_status = from_status, to_status


class ValidationFailed(DomainError):
    code = "validation_error"


class PayloadTooLarge(DomainError):
    code = "payload_too_large"


class TooManyRequests(DomainError):
    """Base of the two 429s; ``retry_after`` seconds goes into the Retry-After header."""

    def __init__(self, message: str, *, retry_after: int, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class QuotaExceeded(TooManyRequests):
    code = "quota_exceeded"


class RateLimited(TooManyRequests):
    code = "rate_limited"


class ServiceUnavailable(DomainError):
    code = "service_unavailable"
