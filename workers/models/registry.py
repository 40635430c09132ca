"""Resolve a BaseModelRef to a local HF directory, caching downloads by content checksum.

A model in the object store carries ``lorafleet-model.json`` (its files' sha256 and the model
checksum), uploaded last: its presence means the upload is complete, and it names the cache
entry without downloading anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from workers.spec import BaseModelRef
from workers.storage import ObjectStore, download_prefix, get_bytes, open_store, put_bytes, upload_dir

BUILTIN_SCHEME = "builtin://"
MODEL_INDEX = "lorafleet-model.json"
MODELS_PREFIX = "models"


class BaseModelError(Exception):
    """The reference names no loadable model (unknown builtin, missing folder, bad checksum)."""


def model_cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_MODEL_CACHE", Path.home() / ".cache" / "lorafleet" / "models"))


def file_sha256s(directory: Path, *, skip: str | None = None) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, bytes)} of every file under ``directory`` but ``skip``."""
    out = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == skip:
            continue
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        out[rel] = (sha.hexdigest(), path.stat().st_size)
    return out


def file_digests(directory: Path) -> dict[str, str]:
    return {rel: sha for rel, (sha, _) in file_sha256s(directory, skip=MODEL_INDEX).items()}


def checksum_of(digests: dict[str, str]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs: names matter, order does not."""
    sha = hashlib.sha256()
    for rel in sorted(digests):
        sha.update(f"{rel}\t{digests[rel]}\n".encode())
    return sha.hexdigest()


def model_checksum(directory: Path) -> str:
    return checksum_of(file_digests(directory))


def builtin_key_prefix(model_id: str) -> str:
    return f"{MODELS_PREFIX}/{model_id}"


def builtin_source_hash() -> str:
    """Identifies a built-in model's inputs: its build code and the shipped corpus."""
    from workers.models import tiny_llama

    sha = hashlib.sha256(Path(tiny_llama.__file__).read_bytes())
    for path in sorted(tiny_llama.CORPUS_DIR.glob("*.jsonl")):
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def local_builtin(model_id: str) -> Path:
    """A built-in model built on this machine (once per source version) in the model cache."""
    from workers.models.tiny_llama import MODEL_ID, build_tiny_llama

    if model_id != MODEL_ID:
        raise BaseModelError(f"unknown built-in model {model_id!r}")
    path = model_cache_dir() / "builtin" / f"{model_id.replace('/', '--')}-{builtin_source_hash()}"
    if (path / "config.json").is_file():
        return path
    # Training runs and serving replicas starting together on a fresh machine: one builds, the
    # others wait for it instead of building the same model three times on the same cores.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            build_tiny_llama(path)
    return path


def upload_model(store: ObjectStore, directory: Path, prefix: str) -> str:
    """Copy a model directory into the store under ``prefix``, index last; return its checksum."""
    digests = file_digests(directory)
    upload_dir(store, directory, prefix)
    checksum = checksum_of(digests)
    index = {"checksum": checksum, "files": digests}
    put_bytes(store, f"{prefix}/{MODEL_INDEX}", json.dumps(index, indent=1).encode())
    return checksum


def ensure_builtin(model_id: str, store: ObjectStore) -> str:
    """Make sure a built-in model sits in the store; return its key prefix.

    Two workers may build and upload at once: the build is deterministic and each object
    upload atomic, so the loser overwrites identical bytes.
    """
    prefix = builtin_key_prefix(model_id)
    if not store.exists(f"{prefix}/{MODEL_INDEX}"):
        upload_model(store, local_builtin(model_id), prefix)
    return prefix


def _fetch(store: ObjectStore, prefix: str, expected: str | None) -> Path:
    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    checksum = None
    if store.exists(f"{prefix}/{MODEL_INDEX}"):
        checksum = json.loads(get_bytes(store, f"{prefix}/{MODEL_INDEX}"))["checksum"]
        if (cache / checksum).is_dir():
            return _verified(cache / checksum, expected)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        download_prefix(store, prefix, tmp)
        actual = model_checksum(tmp)
        if checksum is not None and actual != checksum:
            raise BaseModelError(f"model under {prefix!r} does not match its {MODEL_INDEX}")
        target = cache / actual
        if not target.exists():
            tmp.rename(target)  # atomic: a concurrent fetch of the same model keeps either copy
        return _verified(target, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verified(directory: Path, expected: str | None) -> Path:
    if expected and directory.name != expected and model_checksum(directory) != expected:
        raise BaseModelError(f"model checksum mismatch: expected {expected}")
    return directory


def resolve_base_model(ref: BaseModelRef, store: ObjectStore) -> Path:
    """A local directory holding ``ref``'s HF files (a cache entry named by its checksum).

    ``ref.uri``: ``builtin://<id>``, an object-store key prefix, ``s3://bucket/prefix`` or a local
    directory. Raises BaseModelError, or StorageError when the store fails.
    """
    uri = ref.uri
    if uri.startswith(BUILTIN_SCHEME):
        return _fetch(store, ensure_builtin(uri[len(BUILTIN_SCHEME):], store), ref.checksum)
    if uri.startswith("s3://"):
        bucket_and_prefix = uri[len("s3://"):].split("/", 1)
        if len(bucket_and_prefix) < 2 or not bucket_and_prefix[1].strip("/"):
            raise BaseModelError(f"{uri!r} names no key prefix")
        other = open_store(f"s3://{bucket_and_prefix[0]}")
        return _fetch(other, bucket_and_prefix[1].strip("/"), ref.checksum)
    local = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if local.is_absolute():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"{local} is not a model directory (no config.json)")
        return _verified(local, ref.checksum)
    prefix = uri.strip("/")
    if not store.list(prefix + "/"):
        raise BaseModelError(f"no model under {prefix!r} in the object store")
    return _fetch(store, prefix, ref.checksum)
