"""Receiving a dataset upload: spool with a size limit, validate every line, then store.

The upload is spooled once, to a local temporary file (bounded memory), while its bytes are
counted, so an oversized upload stops as soon as it passes the limit. It is validated there,
line by line with a per-line cap (a longer line is never held in full), before any object or
row exists: an invalid file leaves nothing behind. Only a valid file is streamed on to the
object store, with its sha256 checked again on the way in.

The file name is the tenant's to display, never a path: it is reduced to its last component,
decoded as UTF-8 with invalid bytes replaced, stripped of control characters, and capped.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO

from python_multipart.multipart import parse_options_header

from sqlalchemy.orm import Session
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.db.models import File
from service.errors import BadRequest, PayloadTooLarge, ValidationFailed
from service.files.repository import FILE_ID_PREFIX, object_key_for
from service.ids import new_id, now
from workers.spec import DatasetReport, validate_jsonl
from workers.storage import ObjectStore, StorageError

# Room for the multipart envelope (boundaries, part headers, the purpose field) around the file.
ENVELOPE_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 255  # the column's size
DEFAULT_FILENAME = "upload.jsonl"
_DRAIN_CHUNK = 64 * 1024


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", param="file")


def check_declared_length(headers: Headers, limit: int) -> None:
    """Refuse before reading a byte when Content-Length already says it is too big."""
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + ENVELOPE_BYTES:
        raise too_large(limit)


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit + ENVELOPE_BYTES:
            raise too_large(limit)
        yield chunk


async def parse_upload(headers: Headers, stream: AsyncIterator[bytes], limit: int) -> tuple[UploadFile, str]:
    """(the ``file`` part, the ``purpose`` field) of a multipart body, read under ``limit``."""
    if not headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("send the file as multipart/form-data with fields 'file' and 'purpose'",
                         param="file")
    try:
        form = await MultiPartParser(headers, _limited(stream, limit), max_files=1, max_fields=4).parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}", param="file") from None
    unknown = sorted(set(form.keys()) - {"file", "purpose"})
    if unknown:  # as for JSON bodies: an unknown field is refused, not ignored
        await form.close()
        raise ValidationFailed(f"unknown field {unknown[0]!r}: send only 'file' and 'purpose'", param=unknown[0])
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise ValidationFailed("field 'file' (a file part) is required", param="file")
    if purpose != "fine-tune":
        raise ValidationFailed("purpose must be 'fine-tune'", param="purpose")
    return upload, purpose


def upload_filename(upload: UploadFile) -> str:
    """The part's file name, from its raw header bytes (Starlette falls back to latin-1 for
    invalid UTF-8, which would store it garbled)."""
    for name, value in upload.headers.raw:
        if name.lower() == b"content-disposition":
            raw = parse_options_header(value)[1].get(b"filename")
            if raw is not None:
                return clean_filename(raw)
    return clean_filename(upload.filename)


def clean_filename(raw: bytes | str | None) -> str:
    """A name safe to display and store: no path parts (``../../etc/`` → ``etc``), invalid
    UTF-8 replaced, control and format characters (NUL, newlines, bidi overrides) removed,
    at most ``MAX_FILENAME_CHARS``."""
    name = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else (raw or "")
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    name = name.replace("\\", "/").rstrip("/ ").rsplit("/", 1)[-1].strip()
    if name in ("", ".", ".."):
        return DEFAULT_FILENAME
    return name[:MAX_FILENAME_CHARS]


def _bounded_lines(data: BinaryIO, max_line_bytes: int) -> Iterator[bytes]:
    """The file's lines, each cut to its first ``max_line_bytes + 1`` bytes: a longer line is
    read past in chunks, never held (the validator reports it by its length)."""
    while line := data.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := data.readline(_DRAIN_CHUNK)) and not rest.endswith(b"\n"):
                pass
        yield line


def _invalid(report: DatasetReport) -> ValidationFailed:
    n = len(report.errors)
    detail = (report.errors[0].reason if report.errors[0].line == 0
              else f"{n} line{'s' if n != 1 else ''} invalid; first: line {report.errors[0].line}: "
                   f"{report.errors[0].reason}")
    return ValidationFailed(detail, code="invalid_training_file", param="file",
                            extra={"errors": [e.model_dump() for e in report.errors]})


def store_upload(session: Session, store: ObjectStore, *, tenant_id: str, data: BinaryIO,
                 filename: str, purpose: str, limit: int, max_line_bytes: int) -> File:
    """Validate the spooled upload and store it; the row is added only once the object is in."""
    data.seek(0, 2)
    if data.tell() > limit:
        raise too_large(limit)
    data.seek(0)
    report = validate_jsonl(_bounded_lines(data, max_line_bytes), max_line_bytes=max_line_bytes)
    if not report.ok:
        raise _invalid(report)
    data.seek(0)
    file_id = new_id(FILE_ID_PREFIX)
    key = object_key_for(tenant_id=tenant_id, file_id=file_id)
    try:
        put = store.put_stream(key, data, limit=limit)
    except StorageError:
        store.delete(key)
        raise
    row = File(id=file_id, tenant_id=tenant_id, filename=clean_filename(filename), purpose=purpose,
               bytes=put.bytes, sha256=put.sha256, status="processed", status_details=None,
               format=report.format, examples=report.examples, object_key=key, created_at=now())
    session.add(row)
    try:
        session.commit()
    except BaseException:
        store.delete(key)  # no row, so no object either
        raise
    return row
