"""``Client`` and ``AsyncClient``: the same resources, run by a sync or an async driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from . import _core
from ._core import DEFAULT_MAX_RETRIES, Auth, Call, Core
from ._pagination import AsyncPage, AsyncPager, SyncPage
from ._streaming import AsyncStream, Stream
from .resources.admin import Admin
from .resources.files import Files
from .resources.fine_tuning import FineTuning
from .resources.inference import Chat, Completions
from .resources.models import Adapters, Models

T = TypeVar("T")


class BaseClient:
    def __init__(self, *, base_url: str | None = None, api_key: str | None = None,
                 admin_token: str | None = None, timeout: float | httpx.Timeout | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES,
                 default_headers: dict[str, str] | None = None):
        """Settings not given come from LORAFLEET_BASE_URL / LORAFLEET_API_KEY /
        LORAFLEET_ADMIN_TOKEN. Timeout: 60 s (connect 5 s) unless given."""
        self._core = Core(base_url=base_url, api_key=api_key, admin_token=admin_token,
                          timeout=timeout, max_retries=max_retries, default_headers=default_headers)
        self.files = Files(self)
        self.fine_tuning = FineTuning(self)
        self.models = Models(self)
        self.adapters = Adapters(self)
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.admin = Admin(self)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def _page_call(self, path: str, params: dict[str, Any], auth: Auth) -> Call[dict[str, Any]]:
        return self._core.request("GET", path, params=params, auth=auth, cast=dict)


class Client(BaseClient):
    """The synchronous client. ``http_client`` lets you bring your own ``httpx.Client``."""

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None,
                 admin_token: str | None = None, timeout: float | httpx.Timeout | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, default_headers: dict[str, str] | None = None,
                 http_client: httpx.Client | None = None):
        super().__init__(base_url=base_url, api_key=api_key, admin_token=admin_token, timeout=timeout,
                         max_retries=max_retries, default_headers=default_headers)
        self._http = http_client or httpx.Client(timeout=self._core.timeout)

    def _run(self, call: Call[T]) -> T:
        return _core.run_sync(self._http, call)

    def _paginate(self, path: str, item: Callable[[Any], T], params: dict[str, Any],
                  auth: Auth = "tenant") -> SyncPage[T]:
        def fetch(after: str | None) -> SyncPage[T]:
            body = self._run(self._page_call(path, {**params, "after": after or params.get("after")}, auth))
            return SyncPage(body, item, fetch)

        return fetch(None)

    def _stream(self, call: Call[httpx.Response], cast: Callable[[Any], T]) -> Stream[T]:
        return Stream(self._run(call), cast)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(BaseClient):
    """The asyncio twin: every method returns an awaitable; ``list`` also supports ``async for``."""

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None,
                 admin_token: str | None = None, timeout: float | httpx.Timeout | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, default_headers: dict[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None):
        super().__init__(base_url=base_url, api_key=api_key, admin_token=admin_token, timeout=timeout,
                         max_retries=max_retries, default_headers=default_headers)
        self._http = http_client or httpx.AsyncClient(timeout=self._core.timeout)

    async def _run(self, call: Call[T]) -> T:
        return await _core.run_async(self._http, call)

    def _paginate(self, path: str, item: Callable[[Any], T], params: dict[str, Any],
                  auth: Auth = "tenant") -> AsyncPager[T]:
        async def fetch(after: str | None) -> AsyncPage[T]:
            body = await self._run(self._page_call(path, {**params, "after": after or params.get("after")}, auth))
            return AsyncPage(body, item, fetch)

        return AsyncPager(lambda: fetch(None))

    async def _stream(self, call: Call[httpx.Response], cast: Callable[[Any], T]) -> AsyncStream[T]:
        return AsyncStream(await self._run(call), cast)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
