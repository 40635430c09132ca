"""Cursor pages (`after` = the last id seen) that iterate across pages on their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _PageBody(Generic[T]):
    def __init__(self, body: dict[str, Any], item: Callable[[Any], T]):
        self.data: list[T] = [item(x) for x in body.get("data", [])]
        self.has_more: bool = bool(body.get("has_more", False))
        self.first_id: str | None = body.get("first_id")
        self.last_id: str | None = body.get("last_id")

    @property
    def next_cursor(self) -> str | None:
        if not self.has_more or not self.data:
            return None
        return self.last_id or getattr(self.data[-1], "id", None)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data={self.data!r}, has_more={self.has_more})"


class SyncPage(_PageBody[T]):
    """One page; iterating it yields every item of this page and the ones after it."""

    def __init__(self, body: dict[str, Any], item: Callable[[Any], T],
                 fetch: Callable[[str], SyncPage[T]]):
        super().__init__(body, item)
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return self.next_cursor is not None

    def next_page(self) -> SyncPage[T]:
        cursor = self.next_cursor
        if cursor is None:
            raise StopIteration("no next page")
        return self._fetch(cursor)

    def iter_pages(self) -> Iterator[SyncPage[T]]:
        page: SyncPage[T] | None = self
        while page is not None:
            yield page
            page = page.next_page() if page.has_next_page() else None

    def __iter__(self) -> Iterator[T]:  # type: ignore[override]
        for page in self.iter_pages():
            yield from page.data


class AsyncPage(_PageBody[T]):
    def __init__(self, body: dict[str, Any], item: Callable[[Any], T],
                 fetch: Callable[[str], Awaitable[AsyncPage[T]]]):
        super().__init__(body, item)
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return self.next_cursor is not None

    async def next_page(self) -> AsyncPage[T]:
        cursor = self.next_cursor
        if cursor is None:
            raise StopAsyncIteration("no next page")
        return await self._fetch(cursor)

    async def iter_pages(self) -> AsyncIterator[AsyncPage[T]]:
        page: AsyncPage[T] | None = self
        while page is not None:
            yield page
            page = await page.next_page() if page.has_next_page() else None

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.iter_pages():
            for item in page.data:
                yield item


class AsyncPager(Generic[T]):
    """What an async ``list()`` returns: ``await`` it for the first page, or ``async for`` items."""

    def __init__(self, first: Callable[[], Awaitable[AsyncPage[T]]]):
        self._first = first

    def __await__(self) -> Generator[Any, None, AsyncPage[T]]:
        return self._first().__await__()

    async def __aiter__(self) -> AsyncIterator[T]:
        page = await self._first()
        async for item in page:
            yield item
