"""Resources are written once; the client they hang off decides sync or async execution."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._client import BaseClient


def drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class Resource:
    def __init__(self, client: BaseClient):
        self._client = client
        self._core = client._core
