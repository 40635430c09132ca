"""One exception class per HTTP status, built from the service's RFC 9457 problem+json body."""

from __future__ import annotations

from typing import Any

import httpx


class LoraFleetError(Exception):
    """Base of every error this SDK raises."""


class APIError(LoraFleetError):
    def __init__(self, message: str, *, request: httpx.Request | None = None):
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    def __init__(self, *, request: httpx.Request | None = None, message: str | None = None):
        url = request.url if request is not None else "the server"
        super().__init__(message or f"could not connect to {url}", request=request)


class APITimeoutError(APIConnectionError):
    def __init__(self, *, request: httpx.Request | None = None):
        url = request.url if request is not None else "the server"
        super().__init__(request=request, message=f"request to {url} timed out")


class APIStatusError(APIError):
    """A non-2xx answer. ``code``/``param``/``errors`` come from the problem body."""

    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, body: Any):
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        problem = body if isinstance(body, dict) else {}
        nested = problem.get("error") if isinstance(problem.get("error"), dict) else {}
        self.code: str | None = problem.get("code") or nested.get("code")
        self.param: str | None = problem.get("param") or nested.get("param")
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        self.request_id: str | None = response.headers.get("x-request-id") or problem.get("request_id")

    def __str__(self) -> str:
        return f"{self.status_code} {self.code or 'error'}: {self.message}"


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class PayloadTooLargeError(APIStatusError):
    status_code = 413


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    """Any 5xx."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls
    for cls in (BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                ConflictError, PayloadTooLargeError, UnprocessableEntityError, RateLimitError)
}


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a non-2xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = None
    if isinstance(body, dict):
        nested = body.get("error") if isinstance(body.get("error"), dict) else {}
        message = body.get("detail") or nested.get("message") or body.get("title")
        if not isinstance(message, str):  # FastAPI's own 422 puts a list in `detail`
            message = str(message) if message else None
    message = message or (body if isinstance(body, str) and body else response.reason_phrase)
    status = response.status_code
    cls = InternalServerError if status >= 500 else _BY_STATUS.get(status, APIStatusError)
    return cls(message, response=response, body=body)


class IntegrityError(LoraFleetError):
    """A downloaded file's size or sha256 differs from the one the service recorded."""


class JobWaitError(LoraFleetError):
    def __init__(self, message: str, job: Any):
        super().__init__(message)
        self.job = job


class JobFailedError(JobWaitError):
    """The job ended ``failed``; ``code``/``message`` are the job's ``error``."""

    def __init__(self, job: Any):
        error = job.error
        self.code: str | None = error.code if error else None
        self.message: str = (error.message if error else None) or "the job failed"
        self.param: str | None = error.param if error else None
        super().__init__(f"job {job.id} failed: {self.code or 'error'}: {self.message}", job)


class JobCancelledError(JobWaitError):
    def __init__(self, job: Any):
        super().__init__(f"job {job.id} was cancelled", job)


class WaitTimeoutError(JobWaitError):
    def __init__(self, job: Any, timeout: float):
        super().__init__(f"job {job.id} still '{job.status}' after {timeout:g}s", job)
