"""Server-sent events: the decoder is shared, the sync and async streams only feed it lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from .errors import APIError

T = TypeVar("T")


@dataclass
class ServerSentEvent:
    data: str
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    """Feeds one line at a time (without its newline); returns an event at each blank line."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and self._event is None:
                return None
            sse = ServerSentEvent("\n".join(self._data), self._event, self._id)
            self._data, self._event = [], None
            return sse
        if line.startswith(":"):
            return None  # a comment / keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def flush(self) -> ServerSentEvent | None:
        return self.feed("")


def _decode(sse: ServerSentEvent, cast: Callable[[Any], T]) -> T | None:
    """None marks the end of the stream (``data: [DONE]``)."""
    if sse.data.strip() == "[DONE]":
        return None
    try:
        payload = json.loads(sse.data)
    except ValueError as exc:
        raise APIError(f"malformed stream event: {sse.data[:200]!r}") from exc
    if sse.event == "error" or (isinstance(payload, dict) and "error" in payload and "choices" not in payload):
        err = payload.get("error") if isinstance(payload, dict) else None
        message = err.get("message") if isinstance(err, dict) else str(err or payload)
        raise APIError(f"stream error: {message}")
    return cast(payload)


class Stream(Generic[T]):
    """Iterate to get each chunk; the response is closed at the end, on error, or by ``close``."""

    def __init__(self, response: httpx.Response, cast: Callable[[Any], T]):
        self.response = response
        self._cast = cast

    def __iter__(self) -> Iterator[T]:
        decoder = SSEDecoder()
        try:
            for line in self.response.iter_lines():
                sse = decoder.feed(line)
                if sse is not None:
                    item = _decode(sse, self._cast)
                    if item is None:
                        return
                    yield item
            sse = decoder.flush()
            if sse is not None and (item := _decode(sse, self._cast)) is not None:
                yield item
        finally:
            self.response.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[T]):
    def __init__(self, response: httpx.Response, cast: Callable[[Any], T]):
        self.response = response
        self._cast = cast

    async def __aiter__(self) -> AsyncIterator[T]:
        decoder = SSEDecoder()
        try:
            async for line in self.response.aiter_lines():
                sse = decoder.feed(line)
                if sse is not None:
                    item = _decode(sse, self._cast)
                    if item is None:
                        return
                    yield item
            sse = decoder.flush()
            if sse is not None and (item := _decode(sse, self._cast)) is not None:
                yield item
        finally:
            await self.response.aclose()

    async def close(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
