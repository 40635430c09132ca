from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Union

from .._core import Call
from ..types import Deleted, FileObject
from ._base import Resource

FileInput = Union[str, os.PathLike, bytes, IO[bytes], tuple[str, bytes]]


def _read_upload(file: FileInput, filename: str | None) -> tuple[str, bytes]:
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return filename or path.name, path.read_bytes()
    if isinstance(file, bytes):
        return filename or "data.jsonl", file
    if isinstance(file, tuple):
        return filename or file[0], file[1]
    return filename or Path(getattr(file, "name", "data.jsonl")).name, file.read()


def _content(call: Call[Any]) -> Call[bytes]:
    response = yield from call
    return response.content


class Files(Resource):
    def create(self, file: FileInput, *, purpose: str = "fine-tune", filename: str | None = None,
               idempotency_key: str | None = None):
        """Upload a JSONL dataset (a path, bytes, a binary file or ``(name, bytes)``) -> FileObject.

        An invalid dataset raises UnprocessableEntityError whose ``errors`` lists the bad lines.
        """
        name, content = _read_upload(file, filename)
        return self._client._run(self._core.request(
            "POST", "/v1/files", files={"file": (name, content, "application/jsonl")},
            data={"purpose": purpose}, cast=FileObject.model_validate, idempotency_key=idempotency_key))

    def list(self, *, purpose: str | None = None, limit: int | None = None, after: str | None = None):
        return self._client._paginate("/v1/files", FileObject.model_validate,
                                      {"purpose": purpose, "limit": limit, "after": after})

    def retrieve(self, file_id: str):
        return self._client._run(self._core.request("GET", f"/v1/files/{file_id}",
                                                    cast=FileObject.model_validate))

    def delete(self, file_id: str):
        return self._client._run(self._core.request("DELETE", f"/v1/files/{file_id}",
                                                    cast=Deleted.model_validate))

    def content(self, file_id: str):
        """The uploaded bytes."""
        return self._client._run(_content(self._core.request("GET", f"/v1/files/{file_id}/content")))
