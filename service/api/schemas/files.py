"""File bodies (OpenAI's File object plus sha256, format and example count)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from service.db.models import File


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None
    sha256: str
    format: str | None
    examples: int

    @classmethod
    def of(cls, f: File) -> FilePublic:
        return cls(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename,
                   purpose=f.purpose, status=f.status, status_details=f.status_details,
                   sha256=f.sha256, format=f.format, examples=f.examples)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
