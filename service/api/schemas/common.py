"""Shapes shared by every resource: list pages and their query parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator
from starlette.responses import Response

from service.db.pages import Page

T = TypeVar("T")

# Strict scalar types for request bodies (use them for every int/bool/number field): ``true``
# is not an integer and ``437046.0`` is not one either, "1" is not a boolean (pydantic's lax
# mode accepts all three). A number field takes an integer or a float, never a boolean.
StrictNumber = StrictFloat | StrictInt

Limit = Annotated[int, Query(ge=1, le=100, description="Page size (1-100)")]
After = Annotated[str | None, Query(max_length=200, description="Cursor: the last id of the previous page")]
# Event ids are numbers: ASCII digits only (str.isdigit() would let '¹' through to int()).
EventCursor = Annotated[str | None, Query(pattern=r"^(ftevent-)?[0-9]{1,18}$",
                                          description="Cursor: the last event id of the previous page")]


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

    Strict types everywhere (issue 10): ``true`` or ``437046.0`` for an integer, ``"2"`` for a
    number or ``1`` for a boolean are 422s, not silently converted. (A float field still takes
    an integer.) Models nested in a body inherit this only if they derive from ``Strict`` too.

    NUL characters are refused everywhere: PostgreSQL text cannot hold them, SQLite can, and
    the same request must get the same answer on both.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

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


class ProblemError(BaseModel):
    """The OpenAI-style ``error`` member, so the ``openai`` client shows the message."""

    message: str
    type: str
    code: str
    param: str | None = None


class Problem(BaseModel):
    """Every error answer (RFC 9457 problem+json), served as ``application/problem+json``."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    type: str = Field(description="A URI naming the problem kind: https://lorafleet.dev/problems/<code>")
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable, machine-readable error code")
    param: str | None = Field(None, description="The input at fault, where one is")
    request_id: str | None = None
    error: ProblemError
