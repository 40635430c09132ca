"""Python client for LoRA Fleet: ``Client`` / ``AsyncClient`` mirror the REST API (docs/API.md)."""

from ._client import AsyncClient, Client
from ._pagination import AsyncPage, SyncPage
from ._streaming import AsyncStream, Stream
from .errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    IntegrityError,
    InternalServerError,
    JobCancelledError,
    JobFailedError,
    LoraFleetError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    WaitTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError", "APIError", "APIStatusError", "APITimeoutError", "AsyncClient",
    "AsyncPage", "AsyncStream", "AuthenticationError", "BadRequestError", "Client",
    "ConflictError", "IntegrityError", "InternalServerError", "JobCancelledError",
    "JobFailedError", "LoraFleetError", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitError", "Stream", "SyncPage", "UnprocessableEntityError",
    "WaitTimeoutError",
]
