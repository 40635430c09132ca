"""Cursor pagination shared by every list route: ``after`` is the id of the last row seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from service.errors import ValidationFailed

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_more: bool


def fetch_page(session: Session, query: Select[Any], id_column: Any, *, after: Any | None,
               limit: int, newest_first: bool = True) -> Page[Any]:
    """Rows of ``query`` strictly past the cursor, in id order; one extra row tells ``has_more``."""
    if after is not None:
        query = query.where(id_column < after if newest_first else id_column > after)
    query = query.order_by(id_column.desc() if newest_first else id_column.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return Page(items=rows[:limit], has_more=len(rows) > limit)


def parse_int_cursor(after: str | None, *, prefix: str, param: str = "after") -> int | None:
    """The integer id in a cursor like ``<prefix>123``; anything else is a 422.

    ASCII digits only: ``str.isdigit()`` also accepts Unicode digits ('¹', '٣') that ``int()``
    refuses or reads differently. At most 18 of them, so the id fits a 64-bit column.
    """
    if after is None:
        return None
    digits = after.removeprefix(prefix)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise ValidationFailed(f"{after!r} is not a cursor of this list", code="invalid_cursor", param=param)
    return int(digits)
