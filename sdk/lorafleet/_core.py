"""The request logic, written once as generators that yield I/O operations.

A call is a generator yielding ``Send`` / ``Read`` / ``Sleep``; ``run_sync`` and ``run_async``
perform them with an ``httpx.Client`` or ``httpx.AsyncClient``. Retries, idempotency keys,
pagination requests, ``jobs.wait`` and adapter downloads are therefore one implementation
shared by ``Client`` and ``AsyncClient``.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
import uuid
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx

from .errors import APIConnectionError, APITimeoutError, LoraFleetError, status_error

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 60.0
RETRY_STATUSES = frozenset({408, 409, 429})

Auth = Literal["tenant", "admin"]


@dataclass(frozen=True)
class Send:
    method: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)  # build_request keyword arguments
    stream: bool = False


@dataclass(frozen=True)
class Read:
    """Read (and so release) the body of a streamed response."""

    response: httpx.Response


@dataclass(frozen=True)
class Sleep:
    seconds: float


Call = Generator[Send | Read | Sleep, Any, T]


def run_sync(http: httpx.Client, call: Call[T]) -> T:
    with closing(call):  # on an interrupt (Ctrl-C) the call's own cleanup still runs
        return _drive_sync(http, call)


def _drive_sync(http: httpx.Client, call: Call[T]) -> T:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = call.throw(error) if error is not None else call.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(op, Send):
                value = http.send(http.build_request(op.method, op.url, **op.options), stream=op.stream)
            elif isinstance(op, Read):
                op.response.read()
                op.response.close()
            else:
                sleep(op.seconds)
        except httpx.TransportError as exc:
            error = exc


async def run_async(http: httpx.AsyncClient, call: Call[T]) -> T:
    with closing(call):  # on cancellation the call's own cleanup still runs
        return await _drive_async(http, call)


async def _drive_async(http: httpx.AsyncClient, call: Call[T]) -> T:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = call.throw(error) if error is not None else call.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(op, Send):
                request = http.build_request(op.method, op.url, **op.options)
                value = await http.send(request, stream=op.stream)
            elif isinstance(op, Read):
                await op.response.aread()
                await op.response.aclose()
            else:
                await async_sleep(op.seconds)
        except httpx.TransportError as exc:
            error = exc


# Module attributes so tests can observe the waits without sleeping.
sleep = time.sleep
async_sleep = asyncio.sleep


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def backoff_delay(attempt: int, retry_after: str | None = None) -> float:
    """Retry-After when the server gave one, else exponential backoff with full jitter."""
    hinted = parse_retry_after(retry_after)
    if hinted is not None:
        return hinted
    return random.uniform(0, min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** min(attempt, 30)))


def should_retry(response: httpx.Response) -> bool:
    status = response.status_code
    if status == 409:
        # `invalid_transition` is permanent (a job already finished); other conflicts are transient.
        return _problem_code(response) != "invalid_transition"
    return status in RETRY_STATUSES or status >= 500


def _problem_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


class Core:
    """Configuration plus the retrying request generator."""

    def __init__(self, *, base_url: str | None, api_key: str | None, admin_token: str | None,
                 timeout: float | httpx.Timeout | None, max_retries: int,
                 default_headers: dict[str, str] | None = None):
        base = (base_url or os.environ.get("LORAFLEET_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        # Accept an OpenAI-style base URL ending in /v1: our paths carry the version.
        self.base_url = base.removesuffix("/v1")
        self.api_key = api_key or os.environ.get("LORAFLEET_API_KEY")
        self.admin_token = admin_token or os.environ.get("LORAFLEET_ADMIN_TOKEN")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else (
            DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.default_headers = {"Accept": "application/json", **(default_headers or {})}

    def _auth_header(self, auth: Auth) -> dict[str, str]:
        if auth == "admin":
            if not self.admin_token:
                raise LoraFleetError("no admin token: pass admin_token= or set LORAFLEET_ADMIN_TOKEN")
            return {"Authorization": f"Bearer {self.admin_token}"}
        if not self.api_key:
            raise LoraFleetError("no API key: pass api_key= or set LORAFLEET_API_KEY")
        return {"Authorization": f"Bearer {self.api_key}"}

    def request(self, method: str, path: str, *, cast: Callable[[Any], T] | None = None,
                params: dict[str, Any] | None = None, json: Any = None,
                files: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                auth: Auth = "tenant", stream: bool = False, idempotency_key: str | None = None,
                timeout: float | httpx.Timeout | None = None) -> Call[Any]:
        """Send one logical request, retrying transient failures.

        Returns ``cast(json)``, or the ``httpx.Response`` (body read, or still open when
        ``stream``) when ``cast`` is None.
        """
        headers = {**self.default_headers, **self._auth_header(auth)}
        if method == "POST":
            # One key per logical POST, reused by every retry so the server replays, not repeats.
            headers["Idempotency-Key"] = idempotency_key or f"lf-{uuid.uuid4().hex}"
        options: dict[str, Any] = {"headers": headers, "timeout": timeout or self.timeout}
        if params:
            options["params"] = {k: v for k, v in params.items() if v is not None}
        if json is not None:
            options["json"] = json
        if files is not None:
            options["files"] = files
        if data is not None:
            options["data"] = data
        attempt = 0
        while True:
            op = Send(method, self.base_url + path, options, stream)
            try:
                response = yield op
            except httpx.TimeoutException as exc:
                if attempt < self.max_retries:
                    yield Sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise APITimeoutError(request=getattr(exc, "_request", None)) from exc
            except httpx.TransportError as exc:
                if attempt < self.max_retries:
                    yield Sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise APIConnectionError(request=getattr(exc, "_request", None),
                                         message=f"could not connect to {self.base_url}: {exc}") from exc
            if response.is_success:
                break
            if stream:
                yield Read(response)
            if attempt < self.max_retries and should_retry(response):
                yield Sleep(backoff_delay(attempt, response.headers.get("retry-after")))
                attempt += 1
                continue
            raise status_error(response)
        if cast is None:
            return response
        return cast(response.json())
