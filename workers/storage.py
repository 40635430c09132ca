"""Object storage: one small interface, a local-folder and an S3 implementation.

Torch-free, so both the control plane and the workers use it (workers hold object-store
credentials, never database ones). Keys are '/'-separated paths relative to the store root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

CHUNK = 1024 * 1024


class StorageError(Exception):
    """The object store failed or could not be reached."""


class ObjectNotFound(StorageError):
    pass


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"object exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class PutResult:
    key: str
    bytes: int
    sha256: str


class _HashingReader:
    """Wraps a stream: hashes and counts what is read, and stops past ``limit`` bytes."""

    def __init__(self, raw: BinaryIO, limit: int | None):
        self._raw, self._limit = raw, limit
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n if n and n > 0 else CHUNK)
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise TooLarge(self._limit)
        self.sha.update(data)
        return data


class ObjectStore(Protocol):
    url: str

    def put_stream(self, key: str, stream: BinaryIO, *, limit: int | None = None) -> PutResult: ...
    def open(self, key: str) -> BinaryIO: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def ping(self) -> None: ...


def put_bytes(store: ObjectStore, key: str, data: bytes) -> PutResult:
    import io

    return store.put_stream(key, io.BytesIO(data))


def get_bytes(store: ObjectStore, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


def sha256_of(store: ObjectStore, key: str) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with store.open(key) as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def iter_lines(store: ObjectStore, key: str) -> Iterator[bytes]:
    with store.open(key) as f:
        yield from f  # type: ignore[misc]


def delete_prefix(store: ObjectStore, prefix: str) -> int:
    keys = store.list(prefix)
    for key in keys:
        store.delete(key)
    return len(keys)


def upload_dir(store: ObjectStore, directory: Path, prefix: str) -> dict[str, PutResult]:
    """Upload every file below ``directory`` to ``prefix/<relative path>``."""
    out: dict[str, PutResult] = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        with path.open("rb") as f:
            out[rel] = store.put_stream(f"{prefix.rstrip('/')}/{rel}", f)
    return out


def download_prefix(store: ObjectStore, prefix: str, directory: Path) -> Path:
    """Copy every object under ``prefix/`` into ``directory`` (created), keeping relative paths."""
    prefix = prefix.rstrip("/") + "/"
    keys = store.list(prefix)
    if not keys:
        raise ObjectNotFound(f"no objects under {prefix!r}")
    directory = Path(directory)
    for key in keys:
        target = directory / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        with store.open(key) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    return directory


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """Objects as files below a root folder; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_stream(self, key: str, stream: BinaryIO, *, limit: int | None = None) -> PutResult:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = _HashingReader(stream, limit)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return PutResult(key, reader.size, reader.sha.hexdigest())

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix.strip("/") else self.root
        search = base if base.is_dir() else base.parent
        if not search.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in search.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".upload-"))

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"object store folder {self.root} is missing")


class S3Store:
    """Any S3-compatible endpoint through boto3; large uploads go multipart automatically."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key_id: str | None = None,
                 secret_access_key: str | None = None, max_attempts: int = 3,
                 connect_timeout: float = 5.0):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
            config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                          connect_timeout=connect_timeout, read_timeout=60,
                          signature_version="s3v4"),
        )
        self._transfer = TransferConfig(multipart_threshold=16 * CHUNK, multipart_chunksize=16 * CHUNK)

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    def put_stream(self, key: str, stream: BinaryIO, *, limit: int | None = None) -> PutResult:
        reader = _HashingReader(stream, limit)
        try:
            self._client.upload_fileobj(reader, self.bucket, self._key(key), Config=self._transfer)
        except TooLarge:
            raise
        except self._errors() as exc:
            raise StorageError(f"upload of {key!r} failed: {exc}") from exc
        return PutResult(key, reader.size, reader.sha.hexdigest())

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from None
            raise StorageError(f"download of {key!r} failed: {exc}") from exc
        except self._errors() as exc:
            raise StorageError(f"download of {key!r} failed: {exc}") from exc
        return body  # a streaming, file-like botocore StreamingBody (iterates by line)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(str(exc)) from exc
        except self._errors() as exc:
            raise StorageError(str(exc)) from exc

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors() as exc:
            raise StorageError(f"delete of {key!r} failed: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except self._errors() as exc:
            raise StorageError(f"list of {prefix!r} failed: {exc}") from exc
        return sorted(keys)

    def ping(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._errors() as exc:
            raise StorageError(f"bucket {self.bucket!r} unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._client.create_bucket(Bucket=self.bucket)


def open_store(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1",
               access_key_id: str | None = None, secret_access_key: str | None = None) -> ObjectStore:
    """``file:///abs/dir`` (or a plain path) → LocalStore; ``s3://bucket/prefix`` → S3Store.

    S3 credentials fall back to boto3's usual chain (AWS_* env vars, instance roles).
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                       region=region, access_key_id=access_key_id, secret_access_key=secret_access_key)
    if parsed.scheme in ("file", ""):
        return LocalStore(Path(parsed.path if parsed.scheme else url))
    raise ValueError(f"unsupported object store URL {url!r}: use file:// or s3://")
