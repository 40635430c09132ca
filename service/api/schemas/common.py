"""Shapes shared by every resource: list pages and their query parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.responses import Response

from service.db.pages import Page

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=100, description="Page size (1-100)")]
After = Annotated[str | None, Query(max_length=200, description="Cursor: the last id of the previous page")]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, BaseModel):
        value = value.__dict__
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class Strict(BaseModel):
    """Request bodies: an unknown field is a 422, not silently ignored.

    NUL characters are refused everywhere: PostgreSQL text cannot hold them, SQLite can, and
    the same request must get the same answer on both.
    """

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if _has_nul(value):
            raise ValueError("must not contain NUL characters")
        return value


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, items: Sequence[T], has_more: bool) -> ListPage[T]:
        ids = [i.id for i in items]
        return cls(data=list(items), has_more=has_more, first_id=ids[0] if ids else None,
                   last_id=ids[-1] if ids else None)


def to_page(page: Page[Any], convert: Callable[[Any], T]) -> ListPage[T]:
    return ListPage[T].of([convert(row) for row in page.items], page.has_more)


def json_response(model: BaseModel) -> Response:
    """The bytes FastAPI would send for ``model`` as the route's response model.

    For the hot read routes (polling a job, list pages): FastAPI validates a returned model
    again against the route's response model before dumping it, a second pass over every
    item of a page. The route still declares ``response_model`` (OpenAPI is unchanged) and
    builds ``model`` as exactly that type, so the dump is the same pydantic-core serialiser.
    """
    return Response(model.__pydantic_serializer__.to_json(model), media_type="application/json")
